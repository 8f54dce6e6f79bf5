"""`edgemesh deploy` of a graph package through a two-box mesh (network namespaces).

One story, since every Ray node costs seconds of a 2-core host:

1. two boxes run `edgemesh join`; the worker box deploys its own copy of a
   graph package with `--replicas 2`: each box times the model on its own
   engine and precision, the head's box fetches the package (sha256-checked),
   and the record names both replicas;
2. `tritonclient.http` through the mesh gateway (/v2 on the head) gets the
   same answers as the engine and precision the boxes chose, run here, and
   both replicas serve requests; `edgemesh status --json` lists them;
3. `edgemesh deploy --restore` on the head places the replicas again from the
   records (what a new head's agent runs) and the gateway answers again;
4. the worker box's plug is pulled: every request is still answered (retried
   on the head's replica) and the lost replica is marked down;
5. `edgemesh undeploy` removes the model: /v2 says 404, the replicas are gone.

Needs root and iproute2 (skipped otherwise). Lab: subnet 10.86.0, prefix egd.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgemesh.lab.meshlab import MeshBox, formed, wait_until
from edgemesh.lab.netns import NetnsLab, skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")
triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (edgemesh[dev])")

MESH = "graphlab"
SUBNET = "10.86.0"
HOST = 254
PORT = 8200
FORM_TIMEOUT_S = 120.0


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(2, subnet=SUBNET, host_address=HOST, prefix="egd")
    try:
        yield lab
    finally:
        lab.close()


def _ready(client, name: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.is_model_ready(name):
                return
        except Exception:  # the gateway is (re)starting: not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"model '{name}' did not become ready on the mesh gateway")


def test_graph_package_through_the_mesh(lab: NetnsLab, tmp_path: Path) -> None:
    from edgemesh.graph.build import build_package
    from edgemesh.graph.service import GraphServeOptions, load_graph_service
    from edgemesh.mesh.config import create_secret

    package = tmp_path / "cls"
    build_package("tests.graph_models:classifier", package)
    secret = create_secret(lab.root / "mesh.secret").source
    assert secret is not None
    boxes = [MeshBox(b, secret, MESH) for b in lab.boxes]

    def logs() -> str:
        return "\n".join(f"--- {b.id}\n{b.log_tail()}" for b in boxes)

    local = None
    try:
        # -- 1. two boxes; the worker deploys its own copy --------------------
        for b in boxes:
            b.join()
        head_id = wait_until(lambda: formed(boxes), FORM_TIMEOUT_S, logs)
        head = next(b for b in boxes if b.id == head_id)
        worker = next(b for b in boxes if b is not head)
        own = worker.box.dir / "cls"
        shutil.copytree(package, own)
        out = worker.edgemesh(
            "deploy", str(own), "--name", "cls", "--replicas", "2", "--port", str(PORT),
            "--host", "mesh", "--state-dir", str(worker.state), "--json", timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        record = json.loads(out.stdout)
        assert record["gateway"] == f"http://{head.box.address}:{PORT}/v2"
        by_box = {r["box"]: r for r in record["replicas"]}
        assert sorted(by_box) == sorted(b.id for b in boxes), record
        assert by_box[worker.id]["fetched"] is False  # its own folder, intact
        assert by_box[head.id]["fetched"] is True  # copied from the worker
        assert all(r["p50_ms"] is not None and r["p50_ms"] > 0 for r in by_box.values())

        # -- 2. answers through /v2, both replicas used, status ----------------
        client = triton.InferenceServerClient(f"{head.box.address}:{PORT}")
        _ready(client, "cls")
        chosen = by_box[head.id]
        # Same host, same engine release: the precision each box chose, run here.
        local = load_graph_service(
            package,
            GraphServeOptions(backend=chosen["backend"], precision=chosen["precision"]),
        )
        rng = np.random.default_rng(0)

        def ask() -> None:
            x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
            t = triton.InferInput("input", [1, 3, 32, 32], "FP32")
            t.set_data_from_numpy(x)
            got = client.infer("cls", [t]).as_numpy("output")
            want = local.backend.run({"input": x})[0]
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)

        for _ in range(12):
            ask()
        info = client.get_model_config("cls")["parameters"]["edgemesh"]
        assert sorted(r["url"] for r in info["replicas"]) == sorted(f"box:{b}" for b in by_box)
        assert all(r["served"] > 0 for r in info["replicas"]), info
        out = worker.edgemesh("status", "--json", "--state-dir", str(worker.state), timeout=300)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)["graphs"]["cls"]
        assert shown["gateway"] == record["gateway"]
        assert sorted(r["box"] for r in shown["replicas"]) == sorted(by_box)

        # -- 3. restore from the records (a new head's agent runs this) --------
        out = head.edgemesh(
            "deploy", "--restore", "--state-dir", str(head.state), "--json", timeout=600
        )
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        assert "cls" in json.loads(out.stdout)["restored"]
        _ready(client, "cls")
        for _ in range(4):
            ask()

        # -- 4. the worker's plug is pulled: the head's replica answers --------
        worker.pull_plug()
        for _ in range(6):
            ask()
        info = client.get_model_config("cls")["parameters"]["edgemesh"]
        assert info["retries"] >= 1, info
        up = {r["url"]: r["up"] for r in info["replicas"]}
        assert up == {f"box:{head.id}": True, f"box:{worker.id}": False}, info

        # -- 5. undeploy ---------------------------------------------------------
        out = head.edgemesh("undeploy", "cls", "--state-dir", str(head.state), timeout=600)
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"{record['gateway']}/models/cls", timeout=5)
                if r.status_code == 404:
                    break
            except httpx.HTTPError:
                pass  # the gateway is restarting
            assert time.monotonic() < deadline, "cls is still served after undeploy"
            time.sleep(0.5)
        out = head.edgemesh("status", "--json", "--state-dir", str(head.state), timeout=300)
        assert json.loads(out.stdout)["graphs"] == {}
        out = head.edgemesh("undeploy", "cls", "--state-dir", str(head.state), timeout=300)
        assert out.returncode != 0 and "no graph model 'cls'" in out.stderr
    finally:
        if local is not None:
            local.close()
        for b in boxes:
            b.pull_plug()
