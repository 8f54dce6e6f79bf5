"""Whole-model replicas on several boxes behind one head gateway: balanced by
queue depth, a lost box's requests retried on another, placement by timing.

Boxes are real gateways on loopback (each its own uvicorn server and engine);
the head forwards with the binary-tensor protocol; the client is tritonclient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")
triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (edgemesh[dev])")

from edgemesh.errors import PlanError  # noqa: E402
from edgemesh.gateway import create_app  # noqa: E402
from edgemesh.graph.build import build_package  # noqa: E402
from edgemesh.graph.placement import Candidate, choose_replicas  # noqa: E402
from edgemesh.graph.replicas import RemoteReplica, ReplicaSet  # noqa: E402
from edgemesh.graph.service import GraphServeOptions, load_graph_service  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rep") / "cls"
    build_package("tests.graph_models:classifier", out)
    return out


def _infer(client, x: np.ndarray) -> np.ndarray:
    t = triton.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return client.infer("cls", [t]).as_numpy("output")


def test_head_balances_and_retries_a_lost_box(package: Path) -> None:
    opts = GraphServeOptions(backend="onnxruntime", precision="fp32", threads=1)
    boxes = [load_graph_service(package, opts) for _ in range(2)]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(package / "model.fp32.onnx"))
    servers = [LiveServer(create_app([], graphs=[b])) for b in boxes]
    for s in servers:
        s.__enter__()
    try:
        m = boxes[0].manifest
        head_set = ReplicaSet("cls", m, [RemoteReplica(s.url, "cls") for s in servers], down_s=60)
        with LiveServer(create_app([], graphs=[head_set])) as head:
            client = triton.InferenceServerClient(f"127.0.0.1:{head.port}")
            rng = np.random.default_rng(0)
            for _ in range(10):
                x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
                np.testing.assert_allclose(
                    _infer(client, x), sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6
                )
            served = [r.served for r in head_set.replicas]
            assert sum(served) == 10 and min(served) >= 4  # both boxes took requests
            servers[0].__exit__()  # box 0 is lost
            for _ in range(6):
                x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
                np.testing.assert_allclose(
                    _infer(client, x), sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6
                )
            assert head_set.retries == 1  # one failed try, then box 0 stays out
            assert head_set.replicas[1].served == served[1] + 6
            info = client.get_model_config("cls")["parameters"]["edgemesh"]
            assert [r["up"] for r in info["replicas"]] == [False, True]
            servers[1].__exit__()  # every box lost: 503 with the OIP error body
            import httpx

            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP32",
                        "data": [0.0] * 3072,
                    }
                ]
            }
            r = httpx.post(f"{head.url}/v2/models/cls/infer", json=body, timeout=30)
            assert r.status_code == 503 and "no replica of 'cls' answered" in r.json()["error"]
            # A client error is not a lost box: 400 from the head, nothing retried.
            bad = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 8, 8],
                        "datatype": "FP32",
                        "data": [0.0] * 192,
                    }
                ]
            }
            assert httpx.post(f"{head.url}/v2/models/cls/infer", json=bad).status_code == 400
    finally:
        for s in servers:
            s.__exit__()
        for b in boxes:
            b.close()


def test_placement_keeps_the_boxes_that_serve_it_best() -> None:
    boxes = [
        Candidate("pi", 40.0),
        Candidate("nuc", 6.0),
        Candidate("jetson", 3.5),
        Candidate("old", None),
    ]
    assert [c.box for c in choose_replicas(boxes)] == ["jetson", "nuc"]  # within 2x of 3.5
    assert [c.box for c in choose_replicas(boxes, 3)] == ["jetson", "nuc", "pi"]
    assert [c.box for c in choose_replicas(boxes, 4)][-1] == "old"
    fast = [Candidate("a", 0.2), Candidate("b", 0.9), Candidate("c", 1.5)]
    assert [c.box for c in choose_replicas(fast)] == ["a", "b"]  # within 1 ms: noise
    with pytest.raises(PlanError, match="5 replicas asked for but only 4"):
        choose_replicas(boxes, 5)
    with pytest.raises(PlanError, match="no box"):
        choose_replicas([])


def test_each_box_times_its_engine_at_load(package: Path) -> None:
    service = load_graph_service(
        package, GraphServeOptions(backend="onnxruntime", precision="fp32", threads=1)
    )
    try:
        assert service.info["measured_p50_ms"] > 0
    finally:
        service.close()


def test_deploy_of_a_graph_package_refuses_llm_options_before_touching_the_mesh(
    package: Path, tmp_path: Path
) -> None:
    """Bad input is refused up front (no mesh runs here, so nothing else could answer);
    the deploy itself is tests/test_graph_deploy_netns.py."""
    from typer.testing import CliRunner

    from edgemesh.cli import app

    run = lambda *a: CliRunner().invoke(app, ["deploy", str(package), *a])  # noqa: E731
    result = run("--state-dir", str(tmp_path), "--plan", str(tmp_path / "plan.json"))
    assert result.exit_code == 1
    assert "--boxes and --plan are for LLM packages" in result.output
    for bad in ("0", "two"):
        result = run("--state-dir", str(tmp_path), "--replicas", bad)
        assert result.exit_code == 1 and "--replicas must be 'auto'" in result.output
