"""Graph replicas on three namespace boxes: two boxes serve the package, the
third is the head with `--replica`; one box's plug is pulled (SIGKILL of its
whole process group) mid-run and every request still gets its answer.

Needs root and iproute2 (skipped otherwise). Lab: subnet 10.85.0, prefix ehe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgemesh.lab.netns import NetnsLab, skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")
triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (edgemesh[dev])")

SUBNET = "10.85.0"
HOST = 254
PORT = 8100


def _serve(box, package: Path, *extra: str):
    argv = [
        sys.executable,
        "-m",
        "edgemesh",
        "serve",
        "--model",
        str(package),
        "--host",
        box.address,
        "--port",
        str(PORT),
        "--backend",
        "onnxruntime",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]
    return box.spawn(argv)


def _ready(url: str, proc, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(proc.log_path).read_text()[-2000:]
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become ready: {Path(proc.log_path).read_text()[-2000:]}")


def test_pulling_a_box_plug_reroutes_to_the_other_replica(tmp_path: Path) -> None:
    from edgemesh.graph.build import build_package

    package = tmp_path / "cls"
    build_package("tests.graph_models:classifier", package)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(package / "model.fp32.onnx"))
    with NetnsLab(3, subnet=SUBNET, prefix="ehe", host_address=HOST) as lab:
        b1, b2, head = lab.boxes
        procs = [_serve(b1, package), _serve(b2, package)]
        for box, proc in zip((b1, b2), procs, strict=True):
            _ready(f"http://{box.address}:{PORT}", proc)
        head_proc = _serve(
            head,
            package,
            "--replica",
            f"http://{b1.address}:{PORT}",
            "--replica",
            f"http://{b2.address}:{PORT}",
            "--replicas",
            "2",
        )
        _ready(f"http://{head.address}:{PORT}", head_proc)
        client = triton.InferenceServerClient(f"{head.address}:{PORT}")
        rng = np.random.default_rng(0)

        def ask() -> None:
            x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
            t = triton.InferInput("input", [1, 3, 32, 32], "FP32")
            t.set_data_from_numpy(x)
            got = client.infer("cls", [t]).as_numpy("output")
            np.testing.assert_allclose(got, sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)

        for _ in range(8):
            ask()
        info = client.get_model_config("cls")["parameters"]["edgemesh"]
        replicas = info["replicas"]
        assert len(replicas) == 2 and all(r["served"] > 0 for r in replicas), replicas
        # The head may keep itself as one replica (it serves the package too); pull the
        # plug of a remote one that is in the set.
        remote = [r["url"] for r in replicas if r["url"] != "local"]
        assert remote, replicas
        index = 0 if remote[0].endswith(f"{b1.address}:{PORT}") else 1
        (b1, b2)[index].kill(procs[index])  # SIGKILL of the box's whole process group
        for _ in range(8):
            ask()
        info = client.get_model_config("cls")["parameters"]["edgemesh"]
        assert info["retries"] >= 1
        assert sum(1 for r in info["replicas"] if r["up"]) == 1
