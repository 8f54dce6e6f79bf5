"""Head election: a pure rule over the records a box can see.

The rule, applied by every box every tick to the same verified records,
converges on one head without any extra messages:

1. A box that sees heads follows the best one: the lowest ``(started,
   box id)``. A head that sees a better head steps down and follows it
   (split-brain resolution: two heads that meet keep the older one).
2. With no head in sight, nothing happens until the settle window after
   the box announced itself (or lost its head) has passed, so boxes started
   together see each other first. Then the lowest ``(started, box id)``
   among all live boxes becomes head; the others wait for it to announce.

``started`` is when the box's agent started, so a restarted box never
pre-empts a running mesh, and after a head is lost the longest-running
survivor takes over, which keeps the Ray cluster with the most history.
Records of boxes known to be dead are filtered out before this rule runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgemesh.mesh.records import HEAD, BoxRecord

LEAD = "lead"
FOLLOW = "follow"
WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    """What a box should do now: ``lead`` (be head), ``follow`` ``head``, or ``wait``."""

    action: str
    head: BoxRecord | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "head": self.head.box_id if self.head else None,
            "reason": self.reason,
        }


def decide(me: BoxRecord, peers: Iterable[BoxRecord], *, settled: bool) -> Decision:
    """Apply the rule for ``me`` given the live ``peers`` (``me`` excluded)."""
    others = [p for p in peers if p.box_id != me.box_id]
    heads = [p for p in others if p.role == HEAD]
    if me.role == HEAD:
        heads.append(me)
    if heads:
        best = min(heads, key=lambda r: r.key)
        if best.box_id == me.box_id:
            rivals = len(heads) - 1
            return Decision(LEAD, me, f"best of {rivals + 1} heads" if rivals else "head")
        why = "stepping down for an older head" if me.role == HEAD else "head found"
        return Decision(FOLLOW, best, why)
    if not settled:
        return Decision(WAIT, None, "settling: waiting to hear from other boxes")
    best = min([me, *others], key=lambda r: r.key)
    if best.box_id == me.box_id:
        return Decision(LEAD, me, "oldest box without a head")
    return Decision(WAIT, best, f"waiting for {best.box_id} to become head")
