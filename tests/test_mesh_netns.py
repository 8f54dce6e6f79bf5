"""Three network-namespace boxes on a bridge run ``edgemesh join`` each, as
their own process tree, and form a real Ray cluster with token auth.

The story, in one test because each Ray node costs seconds of 2 cores:
the boxes start at once and form one mesh (time measured); a Ray driver
connects from a worker box through ``edgemesh.mesh.connect`` and runs a task
pinned to a box by its custom resource; a fourth box with another secret is
neither listed nor let into Ray; a worker leaves and rejoins; the head is
killed (its whole box) and the survivors elect a new head and re-form.
Teardown checks that no Ray process of any box is left behind.

Needs root and iproute2 (``.ci/run`` installs it); skipped otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from edgemesh.lab import meshlab
from edgemesh.lab.meshlab import MeshBox
from edgemesh.lab.netns import NetnsLab, skip_reason
from edgemesh.mesh import MeshStatus
from edgemesh.mesh.config import create_secret
from edgemesh.mesh.membership import CRASH, LEAVE, MemberEvent

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")

MESH = "lab"
SUBNET = "10.77.0"  # a private /24 that exists only inside the lab's namespaces
FORM_TIMEOUT_S = 120.0

# Runs inside a box: a Ray driver through the public API, a task pinned to a
# box by its custom resource, and the cluster's alive nodes.
DRIVER = """
import json, sys
from pathlib import Path
import ray
from edgemesh.mesh import connect

conn = connect(Path(sys.argv[1]))

@ray.remote(num_cpus=0, resources={"box:" + sys.argv[2]: 0.01})
def where():
    return ray.util.get_node_ip_address()

nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({
    "address": conn.address,
    "ran_on": ray.get(where.remote(), timeout=60),
    "nodes": sorted(n["NodeManagerAddress"] for n in nodes),
    "boxes": sorted(k for n in nodes for k in n["Resources"] if k.startswith("box:")),
}))
"""

# Runs inside the wrong-secret box: ask the mesh head's GCS for its node
# table with that box's own (wrong) token.
INTRUDER = """
import os, sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
else:
    print("ADMITTED")
"""


def formed(boxes: list[MeshBox]) -> str | None:
    """The head's id once every box lists exactly ``boxes``, agrees on one
    head, reports every box healthy, and sees one alive Ray node per box."""
    want = {b.id for b in boxes}
    heads = set()
    for b in boxes:
        st = b.status()
        if st is None or {x.id for x in st.boxes} != want:
            return None
        if any(x.health != "ok" for x in st.boxes):
            return None
        if [x.role for x in st.boxes].count("head") != 1 or st.head is None:
            return None
        alive = sorted(n["box"] for n in st.ray_nodes if n["alive"])
        if alive != sorted(want) or any(x.ray_node_id is None for x in st.boxes):
            return None
        heads.add(st.head)
    return heads.pop() if len(heads) == 1 else None


def wait_until(what: Callable[[], object], timeout: float, boxes: list[MeshBox]) -> object:
    return meshlab.wait_until(
        what, timeout, lambda: "\n".join(f"--- {b.id}\n{b.log_tail()}" for b in boxes)
    )


def ray_processes(root: Path) -> list[str]:
    """Processes whose command line mentions the lab's folder (Ray's temp
    dirs live there): raylet, gcs_server, workers, agents."""
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(root) in cmd and p.info["pid"] not in ours:
            found.append(f"{p.info['pid']}: {cmd[:160]}")
    return found


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(3, subnet=SUBNET)
    try:
        yield lab
    finally:
        lab.close()


def test_three_boxes_form_a_mesh_survive_leave_rejoin_and_head_loss(lab: NetnsLab) -> None:
    figures: dict[str, float] = {}
    secret = create_secret(lab.root / "mesh.secret").source
    wrong = create_secret(lab.root / "wrong.secret").source
    assert secret is not None and wrong is not None
    boxes = [MeshBox(b, secret, MESH) for b in lab.boxes]
    everyone = list(boxes)
    try:
        # -- 1. three boxes started at once form one mesh ------------------
        t0 = time.monotonic()
        for b in boxes:
            b.join()
        head_id = wait_until(lambda: formed(boxes), FORM_TIMEOUT_S, boxes)
        figures["time_to_form_s"] = time.monotonic() - t0
        head = next(b for b in boxes if b.id == head_id)
        workers = [b for b in boxes if b is not head]

        # `edgemesh status --json` from a worker box lists every box.
        out = workers[0].box.run(
            [sys.executable, "-m", "edgemesh", "status", "--json", "--state-dir",
             workers[0].state],
            timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert sorted(x["id"] for x in doc["boxes"]) == ["box1", "box2", "box3"]
        assert [x["role"] for x in doc["boxes"]].count("head") == 1
        for x in doc["boxes"]:
            assert x["address"] == f"{SUBNET}.{x['id'][3:]}"
            assert x["fingerprint"]["arch"] and x["fingerprint"]["digest"]
            assert x["resources"][f"box:{x['id']}"] == 1.0

        # A Ray driver on a worker box joins through the public API and runs
        # a task on the other worker, pinned by its box resource.
        target = workers[1]
        out = workers[0].box.run(
            [sys.executable, "-c", DRIVER, workers[0].state, target.id], timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen["address"] == f"{head.box.address}:6379"
        assert seen["ran_on"] == target.box.address
        assert seen["nodes"] == sorted(b.box.address for b in boxes)
        assert seen["boxes"] == ["box:box1", "box:box2", "box:box3"]

        # -- 2. a box with another secret is neither listed nor a Ray node --
        intruder = MeshBox(lab.add_box(), wrong, MESH)
        everyone.append(intruder)
        intruder.join()
        # It hears the mesh, trusts none of it, and founds its own.
        wait_until(
            lambda: (
                (st := intruder.status()) is not None
                and st.role == "head"
                and st.ray_address
                and any(r["reason"] == "signature" for r in st.rejected)
            ),
            FORM_TIMEOUT_S,
            everyone,
        )
        wait_until(
            lambda: all(
                any(r["address"] == intruder.box.address and r["reason"] == "signature"
                    for r in (b.status() or MeshStatus(MESH, "none")).rejected)
                for b in boxes
            ),
            30,
            everyone,
        )  # fmt: skip
        for b in boxes:
            st = b.status()
            assert st is not None and "box4" not in {x.id for x in st.boxes}
            assert all(n["box"] != "box4" for n in st.ray_nodes)
        out = intruder.box.run(
            [sys.executable, "-c", INTRUDER, f"{head.box.address}:6379"],
            env=intruder.box.env(
                {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(intruder.state / "ray_token")}
            ),
            timeout=60,
        )
        assert "REFUSED" in out.stdout, out.stdout + out.stderr[-2000:]
        assert intruder.leave() == 0

        # -- 3. a worker leaves and rejoins ----------------------------------
        leaver = workers[1]
        t = time.monotonic()
        assert leaver.leave() == 0
        stayers = [b for b in boxes if b is not leaver]
        wait_until(
            lambda: all(
                (st := b.status()) is not None and leaver.id not in {x.id for x in st.boxes}
                for b in stayers
            ),
            30,
            boxes,
        )
        figures["leave_noticed_s"] = time.monotonic() - t
        assert any(e.kind == LEAVE and e.box_id == leaver.id for e in head.events())
        t = time.monotonic()
        leaver.join()
        assert wait_until(lambda: formed(boxes), FORM_TIMEOUT_S, boxes) == head.id
        figures["rejoin_s"] = time.monotonic() - t

        # -- 4. the head's box dies; the survivors elect a new head ----------
        old_address = f"{head.box.address}:6379"
        t = time.monotonic()
        head.pull_plug()
        new_head_id = wait_until(lambda: formed(workers), FORM_TIMEOUT_S, workers)
        figures["head_loss_to_reformed_s"] = time.monotonic() - t
        survivor = next(b for b in workers if b.id == new_head_id)
        st = survivor.status()
        assert st is not None and st.ray_address != old_address
        assert st.ray_address == f"{survivor.box.address}:6379"
        # The longest-running survivor leads: the one that never restarted.
        assert survivor is workers[0]
        for b in workers:
            assert any(e.kind == CRASH and e.box_id == head.id for e in b.events())

        # -- 5. a worker's box dies: Ray's node death reaches the new head ----
        victim = next(b for b in workers if b is not survivor)
        t = time.monotonic()
        victim.pull_plug()
        crash = wait_until(
            lambda: next(
                (e for e in survivor.events() if e.kind == CRASH and e.box_id == victim.id), None
            ),
            60,
            workers,
        )
        figures["worker_crash_noticed_s"] = time.monotonic() - t
        assert isinstance(crash, MemberEvent) and crash.reason in ("Ray node died", "silent")
        wait_until(
            lambda: (
                (st := survivor.status()) is not None and [x.id for x in st.boxes] == [survivor.id]
            ),
            10,
            workers,
        )
    finally:
        shown = ", ".join(f"{k}={v:.1f}" for k, v in figures.items())
        print(f"\nmesh figures (this host): {shown}")
        codes = {b.id: b.leave() for b in everyone if b.proc is not None}
        leftovers = ray_processes(lab.root)
        in_boxes = {b.id: pids for b in everyone if (pids := b.box.pids())}
        for b in everyone:
            b.box.kill_all()  # whatever a failed step left; the lab removes the rest
    # Every box stopped its own Ray: nothing of it is left on the host.
    assert all(code == 0 for code in codes.values()), codes
    assert leftovers == [], leftovers
    assert in_boxes == {}, in_boxes
