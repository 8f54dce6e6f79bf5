"""Discovery and election over real mDNS (python-zeroconf) on loopback.

Agents run in this process without Ray (``start_ray=False``), so the test
exercises the announce/browse/verify path and the election rule in a few
seconds: boxes started together end with one head, a box with another
secret is ignored, and the survivors re-elect when the head leaves.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgemesh import __version__
from edgemesh.mesh.agent import Agent
from edgemesh.mesh.config import JoinSettings, MeshSecret
from edgemesh.mesh.discovery import browse_once
from edgemesh.mesh.membership import LEAVE, MemberEvent
from edgemesh.mesh.network import MeshInterface
from edgemesh.mesh.ray_node import ray_version
from edgemesh.mesh.records import HEAD, WORKER

pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")

LOOPBACK = MeshInterface("lo", "127.0.0.1")


class Running:
    """An agent on its own thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.thread = threading.Thread(target=agent.run, name=f"agent-{agent.box_id}", daemon=True)

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), f"agent {self.agent.box_id} did not stop"


@pytest.fixture
def mesh_name() -> str:
    # A fresh mesh per test, so concurrent runs on one host never mix.
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start(tmp_path: Path, mesh_name: str) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def make(box_id: str, secret: MeshSecret, *, go: bool = True) -> Running:
        settings = JoinSettings(
            mesh=mesh_name, state_dir=tmp_path / box_id, box_id=box_id, settle_s=1.5
        ).resolved()
        r = Running(Agent(settings, secret, start_ray=False, interface=LOOPBACK))
        running.append(r)
        if go:
            r.thread.start()
        return r

    yield make
    for r in running:
        if r.thread.is_alive():
            r.stop()


def wait_for(what: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s")
        time.sleep(0.1)


def view(r: Running) -> dict[str, str]:
    return {m.record.box_id: m.record.role for m in r.agent.membership.members()}


def test_boxes_started_together_elect_one_head_and_ignore_a_stranger(
    start: Callable[..., Running], mesh_name: str
) -> None:
    secret = MeshSecret(b"the-shared-mesh-secret-0123456789")
    boxes = [start(f"box{i}", secret, go=False) for i in range(3)]
    for r in boxes:  # as close to "the same moment" as threads allow
        r.thread.start()
    stranger = start("intruder", MeshSecret(b"a-different-secret-9876543210"))

    def formed() -> bool:
        views = [view(r) for r in boxes]
        return all(
            set(v) == {"box0", "box1", "box2"}
            and sorted(v.values()) == [HEAD, WORKER, WORKER]
            and r.agent.record.ready
            for v, r in zip(views, boxes, strict=True)
        ) and all(v == views[0] for v in views)

    wait_for(formed)
    heads = [r for r in boxes if r.agent.record.role == HEAD]
    assert len(heads) == 1
    for r in boxes:
        assert r.agent.membership.head == heads[0].agent.box_id
        assert "intruder" not in view(r)
    wait_for(lambda: all(any(x.reason == "signature" for x in r.agent.discovery.rejected())
                         for r in boxes))  # fmt: skip
    # The stranger sees none of the mesh either, and founds its own.
    assert set(view(stranger)) == {"intruder"}

    # A passive browse with the secret lists the same boxes, not the stranger.
    records, rejected = browse_once(
        mesh=mesh_name,
        key=secret.mdns_key(mesh_name),
        address=LOOPBACK.address,
        version=__version__,
        ray_version=ray_version(),
        seconds=2.5,
    )
    assert sorted(r.box_id for r in records) == ["box0", "box1", "box2"]
    assert any(x.reason == "signature" for x in rejected)

    # The head leaves: the others get a leave event and elect a new head.
    events: list[MemberEvent] = []
    survivors = [r for r in boxes if r is not heads[0]]
    for r in survivors:
        r.agent.membership.subscribe(events.append)
    left_at = time.monotonic()
    heads[0].stop()
    wait_for(lambda: sum(1 for e in events if e.kind == LEAVE) == 2, timeout=10)
    noticed_s = time.monotonic() - left_at
    wait_for(
        lambda: all(
            set(view(r)) == {s.agent.box_id for s in survivors}
            and sorted(view(r).values()) == [HEAD, WORKER]
            for r in survivors
        )
    )
    new_head = [r for r in survivors if r.agent.record.role == HEAD]
    assert len(new_head) == 1
    # The longest-running survivor takes over.
    assert new_head[0].agent.record.key == min(r.agent.record.key for r in survivors)
    print(f"leave noticed by both survivors in {noticed_s:.2f} s")
