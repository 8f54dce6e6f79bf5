"""Graph (vision) models on the dashboard's Models view: a classifier package
built by the test (`edgemesh.graph.build`), served over /v2, is listed by
/api/models and on the page, and its package by /api/packages as a graph."""

from __future__ import annotations

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
