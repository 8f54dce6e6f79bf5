"""Graph (vision) models on the dashboard's Models view: a classifier package
built by the test (`edgemesh.graph.build`), served over /v2, is listed by
/api/models and on the page, and its package by /api/packages as a graph."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")

from edgemesh.gateway import create_app
from tests.fixtures.browser import browser_page, skip_reason


@pytest.fixture(scope="module")
def graph_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgemesh.graph.build import build_package

    out = tmp_path_factory.mktemp("graphs") / "cls"
    build_package("tests.graph_models:classifier", out)
    return out


@pytest.fixture
def gateway(graph_package: Path, live_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from edgemesh.graph.service import GraphServeOptions, load_graph_service

    monkeypatch.setenv("EDGEMESH_PACKAGES", str(graph_package.parent))
    service = load_graph_service(
        graph_package, GraphServeOptions(backend="onnxruntime", precision="fp32", threads=1)
    )
    try:
        with live_server(create_app([], graphs=[service])) as srv:
            yield srv.url
    finally:
        service.close()


def test_graph_models_are_listed_by_the_api_and_the_page(gateway: str, graph_package: Path) -> None:
    models = httpx.get(gateway + "/api/models", timeout=30).json()
    (graph,) = models["graph_models"]
    assert graph["name"] and graph["inputs"] and graph["outputs"]
    assert graph["backend"] == "onnxruntime" and graph["precision"] == "fp32"
    packages = httpx.get(gateway + "/api/packages", timeout=30).json()["packages"]
    mine = [p for p in packages if p["path"] == str(graph_package.resolve())]
    assert mine and mine[0]["kind"] == "graph"
    # Plan refuses a graph package with the reason (it runs whole on one box).
    r = httpx.post(gateway + "/api/plan", json={"package": str(graph_package)}, timeout=30)
    assert r.status_code == 409 and "graph model" in r.json()["error"]["message"]

    why = skip_reason()
    if why:
        pytest.skip(f"API checked; the page part {why}")
    with browser_page() as page:
        page.goto(gateway + "/dashboard")
        page.click("#tabs button[data-view=models]")
        page.locator("#graphs td", has_text=graph["name"]).first.wait_for()
        assert graph["inputs"][0]["name"] in page.inner_text("#graphs")


def test_a_graph_package_is_deployed_and_undeployed_from_the_page(
    graph_package: Path, live_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`edgemesh serve` with no graph: the page lists the graph package, its
    Deploy serves it on /v2 (the engine and precision this box picks), an
    inference answers, and Undeploy stops it (404 after)."""
    import math

    from edgemesh.gateway.manager import LocalManager

    monkeypatch.setenv("EDGEMESH_PACKAGES", str(graph_package.parent))
    app = create_app([], manager=LocalManager(state_dir=tmp_path))
    with live_server(app) as srv:
        base = srv.url
        (pkg,) = [
            p
            for p in httpx.get(base + "/api/packages", timeout=30).json()["packages"]
            if p["path"] == str(graph_package.resolve())
        ]
        # A plan makes no sense for a graph: refused with the reason.
        r = httpx.post(base + "/api/models", json={"package": pkg["path"], "plan": {}}, timeout=30)
        assert r.status_code == 409 and "graph model" in r.json()["error"]["message"]

        def wait_job(job: dict) -> dict:
            for _ in range(600):
                if job["state"] != "running":
                    return job
                time.sleep(0.2)
                job = httpx.get(base + f"/api/jobs/{job['id']}", timeout=30).json()
            raise AssertionError(f"job still running: {job}")

        why = skip_reason()
        if why:  # the API alone, as the page would call it
            r = httpx.post(base + "/api/models", json={"package": pkg["path"]}, timeout=30)
            assert r.status_code == 202, r.text
            assert wait_job(r.json()["job"])["state"] == "done"
        else:
            with browser_page() as page:
                page.goto(base + "/dashboard")
                page.click("#tabs button[data-view=models]")
                row = page.locator(f"tr[data-package='{pkg['path']}']")
                row.locator("button[data-act=deploy-graph]").click()
                page.wait_for_selector("#job.done, #job.failed", timeout=300_000)
                assert "done" in page.inner_text("#job"), page.inner_text("#job")
                page.locator("#graphs td", has_text=pkg["name"]).first.wait_for(timeout=30_000)

        name = pkg["name"]
        meta = httpx.get(base + f"/v2/models/{name}", timeout=30).json()
        inputs = []
        for t in meta["inputs"]:
            shape = [1 if d < 0 else d for d in t["shape"]]
            inputs.append(
                {
                    "name": t["name"],
                    "shape": shape,
                    "datatype": t["datatype"],
                    "data": [0] * math.prod(shape),
                }
            )
        r = httpx.post(base + f"/v2/models/{name}/infer", json={"inputs": inputs}, timeout=60)
        assert r.status_code == 200, r.text
        assert {o["name"] for o in r.json()["outputs"]} == {o["name"] for o in meta["outputs"]}
        listed = httpx.get(base + "/api/packages", timeout=30).json()["packages"]
        assert [p["deployed_as"] for p in listed if p["path"] == pkg["path"]] == [[name]]
        (graph,) = httpx.get(base + "/api/models", timeout=30).json()["graph_models"]
        assert graph["path"] == pkg["path"] and graph["backend"]

        r = httpx.delete(base + f"/api/models/{name}", timeout=30)
        assert r.status_code == 202 and wait_job(r.json()["job"])["state"] == "done"
        assert httpx.get(base + f"/v2/models/{name}", timeout=30).status_code == 404
        kinds = [e["kind"] for e in httpx.get(base + "/api/events", timeout=30).json()["events"]]
        assert kinds[-2:] == ["deploy", "undeploy"]
