"""Two namespace boxes with one hostname form a mesh with default flags, and a
deploy started the moment `status` lists them waits for the mesh to settle
(issue 13, parts 2 and 3).

Network namespaces share the host's hostname and /etc/machine-id, like boxes
cloned from one SD-card image. Each box runs `edgemesh join --mesh M
--secret-file F` and nothing else (no --box-id, --interface, --state-dir:
the state folder is the default one under the box's own HOME). Their ids
must differ by the MAC of each box's own eth0. As soon as `edgemesh status
--json` on one box lists both, that box runs `edgemesh deploy` with default
--wait: it must wait (the Ray cluster is still forming then) and deploy over
both boxes, and the gateway must answer.

Subnet 10.81.0 and prefix "eha" are this module's own. Needs root and
iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from edgemesh import Client
from edgemesh.lab.meshlab import MeshBox, formed, wait_until
from edgemesh.lab.netns import NetnsLab, skip_reason
from edgemesh.mesh.config import read_json
from tests.fixtures.tiny_models import shared_tiny_package

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")

MESH = "samehost"
SUBNET = "10.81.0"
HOST = 254
PORT = 8000
TIMEOUT_S = 180.0
# Slow compute and plenty of memory: the planner spreads the layers over both boxes.
COMPUTE = {"onnxruntime/fp32": {"gflops": 0.01, "bandwidth_gbps": 0.5}}


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(2, subnet=SUBNET, host_address=HOST, prefix="eha")
    try:
        yield lab
    finally:
        lab.close()


def _listed(box: MeshBox, n: int) -> list[str] | None:
    """The box ids `edgemesh status --json` prints on ``box`` once it lists ``n``."""
    out = box.edgemesh("status", "--mesh", MESH, "--json", timeout=60)
    if out.returncode != 0:
        return None
    ids = [b["id"] for b in json.loads(out.stdout)["boxes"]]
    return ids if len(ids) == n else None


def test_same_hostname_boxes_mesh_with_default_flags_and_deploy_waits(lab: NetnsLab) -> None:
    from edgemesh.fingerprint import box_facts, default_box_id
    from edgemesh.mesh.config import create_secret
    from edgemesh.mesh.settle import unsettled

    package = shared_tiny_package("qwen3")
    secret = create_secret(lab.root / "mesh.secret").source
    assert secret is not None
    boxes = [MeshBox(b, secret, MESH, default_flags=True) for b in lab.boxes]

    def logs() -> str:
        return "\n".join(f"--- {b.box.name} ({b.id})\n{b.log_tail()}" for b in boxes)

    hostnames = {b.box.run(["hostname"]).stdout.strip() for b in boxes}
    assert len(hostnames) == 1, hostnames  # the premise: one hostname for both
    try:
        for b in boxes:
            b.join()
        deployer = boxes[1]
        ids = wait_until(lambda: _listed(deployer, 2), TIMEOUT_S, logs)
        settling_at_start = unsettled(read_json(deployer.state / "state.json") or {})

        # -- deploy the moment status lists both boxes (default --wait) --------
        profiles = lab.root / "profiles.json"
        profiles.write_text(json.dumps([
            {"id": i, "memory_limit_bytes": 1 << 30, "backends": ["onnxruntime"],
             "compute": COMPUTE}
            for i in ids
        ]))  # fmt: skip
        out = deployer.edgemesh(
            "deploy", str(package), "--mesh", MESH, "--name", "tiny", "--boxes", str(profiles),
            "--port", str(PORT), "--json", "--host", "mesh", timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        print(f"settling when deploy started: {settling_at_start}\n{out.stderr}", file=sys.stderr)
        if settling_at_start:  # it was still settling when deploy started: it waited
            assert "waiting for the mesh to settle" in out.stderr, out.stderr
            assert "mesh settled after" in out.stderr
        record = json.loads(out.stdout)
        assert {s["box"] for s in record["stages"]} == set(ids)

        # -- one mesh of two boxes with distinct, MAC-derived default ids -------
        head_id = wait_until(lambda: formed(boxes), TIMEOUT_S, logs)
        assert head_id in ids and sorted(b.id for b in boxes) == sorted(ids)
        assert len(set(ids)) == 2
        (hostname,) = hostnames
        _, machine_id, _ = box_facts()  # the host's: every namespace shares it
        for b in boxes:
            link = b.box.run(["ip", "-o", "link", "show", "eth0"]).stdout
            mac = link.split("link/ether ")[1].split()[0]  # the box's own veth
            assert b.id == default_box_id(hostname, machine_id, mac), (b.id, mac)
            kept = json.loads((b.state / "box_id").read_text())
            assert kept["box_id"] == b.id
            assert f"box {b.id} (derived) joining mesh" in b.log_tail(20000)

        # -- the deployed model answers through the head's gateway (the SDK) ----
        with Client(record["gateway"], timeout_s=300) as sdk:
            chat = sdk.chat("tiny", "Hello", max_tokens=4, temperature=0)
            assert chat.usage is not None and chat.usage.completion_tokens == 4
            status = sdk.status()  # the mesh gateway's management API
            assert status.mode == "mesh" and status.head == head_id
            assert sorted(b["id"] for b in status.boxes) == sorted(ids)
    finally:
        for b in boxes:
            b.leave()
        time.sleep(0.5)
        print(logs()[-3000:], file=sys.stderr)
