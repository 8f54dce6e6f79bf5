"""Waiting for a mesh to settle before acting on it (``edgemesh deploy``).

``edgemesh status`` lists a box as soon as its mDNS record is verified, but
the box joins the head's Ray cluster seconds later; a deploy planned in
between would leave that box out, or fail because this box has no Ray
address yet. A mesh is *settled*, as this box's agent sees it, when:

* this box is in a Ray cluster (its agent knows the head's Ray address);
* exactly one box is the head;
* every listed box is healthy (``ok``) and has an alive node in the head's
  Ray node table.

``unsettled`` lists what is still under way (empty: settled) from the
agent's ``state.json``; ``wait_settled`` polls it with a deadline, reports
progress, and raises ``MeshSettlingError`` naming what still settles. A
box never seen over mDNS cannot be waited for: that is what
``edgemesh status`` is for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgemesh.errors import BoxLostError, ConfigError, MeshSettlingError
from edgemesh.mesh.config import state_folder
from edgemesh.mesh.status import MeshStatus, from_agent, read_agent_state

DEFAULT_WAIT_S = 120.0
"""Three boxes on a 2-core host formed a Ray cluster in well under a minute
(tests/test_mesh_netns.py); slow boards get twice that."""
NO_AGENT_GRACE_S = 10.0
"""How long to wait for an agent that has not written its state yet (a
``join --detach`` started just before): after that, no agent is an error."""
PROGRESS_EVERY_S = 5.0


def unsettled(doc: dict[str, Any]) -> list[str]:
    """What keeps the mesh in ``doc`` (an agent's ``state.json``) from being
    settled, one phrase each; empty when it is settled."""
    return unsettled_status(from_agent(doc), (doc.get("decision") or {}).get("reason"))


def unsettled_status(status: MeshStatus, reason: str | None = None) -> list[str]:
    """``unsettled`` of a status read from an agent (``reason``: its election decision)."""
    out = []
    if not status.ray_address:
        why = reason or "electing a head"
        out.append(f"this box ({status.box_id}) is not in a Ray cluster yet ({why})")
    heads = sorted(b.id for b in status.boxes if b.role == "head")
    if not heads:
        out.append("no head elected yet")
    elif len(heads) > 1:
        out.append(f"{len(heads)} boxes claim to lead ({', '.join(heads)})")
    for box in status.boxes:
        if box.health != "ok":
            out.append(f"{box.id}: {box.health}")
        elif status.ray_address and box.ray_node_id is None:
            out.append(f"{box.id}: no alive Ray node in the head's table yet")
    return out


def wait_settled(
    state_dir: Path | None = None,
    *,
    mesh: str | None = None,
    timeout_s: float = DEFAULT_WAIT_S,
    progress: Callable[[str], None] | None = None,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> MeshStatus:
    """Block until this box's agent sees a settled mesh; returns its status.

    ``timeout_s=0`` checks once. ``progress`` gets a line when what is
    settling changes, and every ``PROGRESS_EVERY_S`` while it does not.
    Raises ``MeshSettlingError`` (with ``.settling``) at the deadline,
    ``BoxLostError`` when no agent runs for the folder (after a short grace
    for one that is starting), ``ConfigError`` for an agent of another mesh.
    """
    if timeout_s < 0:
        raise ConfigError(f"--wait must be >= 0 seconds, got {timeout_s}")
    folder = state_folder(state_dir, mesh)
    start = clock()
    said: tuple[list[str], float] | None = None
    while True:
        doc = read_agent_state(folder)
        waited = clock() - start
        if doc is None:
            if waited >= min(timeout_s, NO_AGENT_GRACE_S):
                raise BoxLostError(
                    f"no edgemesh agent is running for {folder}",
                    hint="run `edgemesh join` on this box",
                )
            todo = [f"no edgemesh agent is running for {folder} yet"]
        else:
            if mesh is not None and doc.get("mesh") != mesh:
                raise ConfigError(
                    f"the agent in {folder} serves mesh '{doc.get('mesh')}', not '{mesh}'"
                )
            todo = unsettled(doc)
            if not todo:
                if said is not None and progress is not None:
                    progress(f"mesh settled after {waited:.0f} s")
                return from_agent(doc)
        if waited >= timeout_s:
            raise MeshSettlingError(
                f"the mesh did not settle within {timeout_s:.0f} s: {'; '.join(todo)}",
                settling=todo,
                hint="check `edgemesh status` and the agents' logs, or pass a longer --wait",
            )
        if progress is not None and (
            said is None or said[0] != todo or clock() - said[1] >= PROGRESS_EVERY_S
        ):
            progress(
                f"waiting for the mesh to settle ({waited:.0f} s of {timeout_s:.0f} s): "
                + "; ".join(todo)
            )
            said = (todo, clock())
        sleep(poll_s)
