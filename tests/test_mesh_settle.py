"""`edgemesh deploy` waits for the mesh to settle (issue 13, part 3).

Membership comes from real agents (discovery and election over mDNS on
loopback, no Ray, as in test_mesh_discovery.py); the Ray part of their
state is then filled in as an agent with Ray writes it, stage by stage, so
each step of "settling" is seen by the same reader `deploy` uses. The full
path (two namespace boxes, deploy right after `status` lists them) is in
test_box_id_netns.py.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.errors import BoxLostError, MeshSettlingError
from edgemesh.mesh.agent import Agent
from edgemesh.mesh.config import JoinSettings, MeshSecret, StatePaths, write_json
from edgemesh.mesh.network import MeshInterface
from edgemesh.mesh.records import HEAD
from edgemesh.mesh.settle import unsettled, wait_settled

pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")

LOOPBACK = MeshInterface("lo", "127.0.0.1")
NO_NODE = "{}: no alive Ray node in the head's table yet"


@pytest.fixture(scope="module")
def formed_doc(tmp_path_factory) -> dict:
    """The state.json of a worker of a real two-box mesh (no Ray)."""
    root = tmp_path_factory.mktemp("settle")
    mesh = f"t{uuid.uuid4().hex[:10]}"
    secret = MeshSecret(b"the-shared-mesh-secret-0123456789")
    agents = []
    for box in ("alpha", "beta"):
        settings = JoinSettings(
            mesh=mesh, state_dir=root / box, box_id=box, settle_s=1.0
        ).resolved()
        agents.append(Agent(settings, secret, start_ray=False, interface=LOOPBACK))
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            docs = [a.state() for a in agents]
            if all(
                sorted(m["role"] for m in d["members"]) == ["head", "worker"]
                and all(m["ready"] for m in d["members"])
                for d in docs
            ):  # fmt: skip
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no mesh formed: {[a.state()['members'] for a in agents]}")
        worker = next(a for a in agents if a.record.role != HEAD)
        return json.loads(json.dumps(worker.state(), default=str))
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=15)


def with_ray(doc: dict, alive: list[str], *, address: str = "127.0.0.1:6379") -> dict:
    """``doc`` as an agent with Ray writes it: the head's address once this box
    is in the cluster, the node table with an alive node per box in ``alive``."""
    out = copy.deepcopy(doc)
    out["ray"] = {
        **out["ray"],
        "enabled": True,
        "address": address,
        "nodes": [
            {"node_id": f"n-{b}", "address": "127.0.0.1", "alive": True, "is_head": False,
             "box": b, "resources": {f"box:{b}": 1.0}}
            for b in alive
        ],
    }  # fmt: skip
    for m in out["members"]:  # as Membership.set_ray_alive: None for a box not in the table
        m["ray_alive"] = True if m["id"] in alive else None
    return out


def test_each_step_of_settling_is_named(formed_doc: dict) -> None:
    me = formed_doc["box_id"]
    no_ray = copy.deepcopy(formed_doc)
    no_ray["ray"]["address"] = ""
    assert unsettled(no_ray)[0].startswith(f"this box ({me}) is not in a Ray cluster yet (")

    head = next(m["id"] for m in formed_doc["members"] if m["role"] == "head")
    only_head = with_ray(formed_doc, [head])
    assert unsettled(only_head) == [NO_NODE.format(me)]

    electing = copy.deepcopy(formed_doc)
    for m in electing["members"]:
        m["role"] = "candidate"
    assert "no head elected yet" in unsettled(with_ray(electing, [head, me]))
    assert f"{me}: electing" in unsettled(with_ray(electing, [head, me]))

    assert unsettled(with_ray(formed_doc, [head, me])) == []


def _write_state(folder: Path, doc: dict) -> None:
    live = {**doc, "pid": os.getpid(), "running": True, "updated": time.time()}
    write_json(StatePaths(folder).ensure().state, live)


def test_wait_returns_once_every_box_is_in_ray_and_says_what_it_waited_for(
    formed_doc: dict, tmp_path: Path
) -> None:
    head = next(m["id"] for m in formed_doc["members"] if m["role"] == "head")
    me = formed_doc["box_id"]
    folder = tmp_path / "state"
    steps = [
        with_ray(formed_doc, [], address=""),  # electing done, Ray not joined
        with_ray(formed_doc, [head]),  # in the head's cluster, own node not up yet
        with_ray(formed_doc, [head, me]),
    ]
    _write_state(folder, steps[0])
    stop = threading.Event()

    def agent() -> None:  # the agent rewrites state.json every half second
        t0 = time.monotonic()
        while not stop.wait(0.2):
            step = min(2, int((time.monotonic() - t0) / 1.0))
            _write_state(folder, steps[step])

    writer = threading.Thread(target=agent, daemon=True)
    writer.start()
    lines: list[str] = []
    try:
        status = wait_settled(folder, timeout_s=20, progress=lines.append, poll_s=0.1)
    finally:
        stop.set()
        writer.join()
    assert sorted(b.id for b in status.boxes) == sorted([head, me])
    assert all(b.ray_node_id for b in status.boxes)
    assert any("not in a Ray cluster yet" in ln for ln in lines)
    assert any(NO_NODE.format(me) in ln for ln in lines)
    assert lines[-1].startswith("mesh settled after")


def test_wait_times_out_with_a_typed_error_naming_what_still_settles(
    formed_doc: dict, tmp_path: Path
) -> None:
    head = next(m["id"] for m in formed_doc["members"] if m["role"] == "head")
    me = formed_doc["box_id"]
    folder = tmp_path / "state"
    _write_state(folder, with_ray(formed_doc, [head]))
    lines: list[str] = []
    with pytest.raises(MeshSettlingError) as err:
        wait_settled(folder, timeout_s=1.0, progress=lines.append, poll_s=0.1)
    assert err.value.settling == [NO_NODE.format(me)]
    assert "did not settle within 1 s" in str(err.value) and "--wait" in str(err.value)
    assert lines and "waiting for the mesh to settle" in lines[0]
    with pytest.raises(MeshSettlingError):
        wait_settled(folder, timeout_s=0)  # --wait 0 checks once
    # No agent at all is not "settling": it fails at once.
    with pytest.raises(BoxLostError, match="no edgemesh agent"):
        wait_settled(tmp_path / "nobody", timeout_s=0)


def test_deploy_cli_waits_and_fails_with_the_settling_error(
    formed_doc: dict, tmp_path: Path
) -> None:
    from edgemesh.cli import app

    head = next(m["id"] for m in formed_doc["members"] if m["role"] == "head")
    folder = tmp_path / "state"
    _write_state(folder, with_ray(formed_doc, [head]))
    result = CliRunner().invoke(
        app, ["deploy", str(tmp_path / "pkg"), "--state-dir", str(folder), "--wait", "1"]
    )
    assert result.exit_code == 1
    assert "waiting for the mesh to settle" in result.output
    assert "the mesh did not settle within 1 s" in result.output
    assert NO_NODE.format(formed_doc["box_id"]) in result.output


def test_status_says_what_deploy_would_wait_for(formed_doc: dict, tmp_path: Path) -> None:
    from edgemesh.cli import app

    head = next(m["id"] for m in formed_doc["members"] if m["role"] == "head")
    me = formed_doc["box_id"]
    folder = tmp_path / "state"
    runner = CliRunner()
    status = ["status", "--state-dir", str(folder), "--mesh", formed_doc["mesh"]]
    _write_state(folder, with_ray(formed_doc, [head]))
    doc = json.loads(runner.invoke(app, [*status, "--json"]).stdout)
    assert doc["settling"] == [NO_NODE.format(me)]
    text = runner.invoke(app, status).output
    assert f"settling: {NO_NODE.format(me)}" in text
    _write_state(folder, with_ray(formed_doc, [head, me]))
    doc = json.loads(runner.invoke(app, [*status, "--json"]).stdout)
    assert doc["settling"] == []
