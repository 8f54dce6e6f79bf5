"""Boxes joining while a model is served: the gateway's membership watcher.

Runs in the gateway replica on the head. It follows the mesh's membership
through the Ray node table (``box:<id>`` resources of alive nodes): that is
the very table the agents turn into ``join``/``crash`` events, and it is
what the replica can read from inside Ray without an agent's state folder.
Departures need no watcher: the first call that touches a lost stage fails
and the pipeline recovers (``RayPipeline._recover``).

When the set of alive boxes grows, each pipeline asks its placer for a
better plan (``PlanPlacer.after_join``: adopted only when it beats the
current bottleneck by ``REPLAN_MARGIN``). A box that was not profiled at
deploy time measures itself first, in a task pinned to it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgemesh.sharding.planner.boxes import BoxProfile

log = logging.getLogger(__name__)


def alive_boxes(ray: Any) -> set[str]:
    """Box ids with an alive Ray node."""
    out: set[str] = set()
    for node in ray.nodes():
        if node.get("Alive"):
            out.update(k[4:] for k in node.get("Resources", {}) if k.startswith("box:"))
    return out


class MembershipWatcher(threading.Thread):
    """Polls the node table every ``period_s`` and re-places pipelines on joins."""

    def __init__(
        self,
        ray: Any,
        pipelines: Sequence[Any],
        *,
        period_s: float = 2.0,
        measure: Callable[[str], BoxProfile] | None = None,
    ) -> None:
        super().__init__(name="edgemesh-membership", daemon=True)
        self._ray = ray
        self._pipelines = list(pipelines)
        self._period = period_s
        self._measure = measure
        self._halt = threading.Event()
        self._seen: set[str] = set()
        self._unmeasurable: set[str] = set()

    def stop(self) -> None:
        self._halt.set()

    def add(self, pipeline: Any) -> None:
        """Watch one more pipeline (a model deployed from the dashboard)."""
        self._pipelines.append(pipeline)

    def remove(self, pipeline: Any) -> None:
        self._pipelines = [p for p in self._pipelines if p is not pipeline]

    def run(self) -> None:
        while not self._halt.wait(self._period):
            try:
                self.check()
            except Exception:  # keep watching; one bad round must not end it
                log.exception("membership check failed")

    def check(self) -> None:
        """One round: what is alive now, and does any pipeline want to move?"""
        alive = alive_boxes(self._ray)
        joined = alive - self._seen
        self._seen = alive
        self._unmeasurable &= alive  # a box that left and returns is measured again
        if not joined:
            return
        log.info("boxes up: %s (new: %s)", sorted(alive), sorted(joined))
        for pipe in self._pipelines:
            placer = getattr(pipe, "placer", None)
            if placer is None or not hasattr(pipe, "consider_join"):
                continue
            self._profile_new(placer, alive)
            pipe.consider_join()

    def _profile_new(self, placer: Any, alive: set[str]) -> None:
        if self._measure is None or not hasattr(placer, "profiled"):
            return
        for box in sorted(alive - placer.profiled() - self._unmeasurable):
            try:
                placer.add_profile(self._measure(box))
            except Exception as exc:
                # Unmeasured boxes are left out of plans, not fatal.
                self._unmeasurable.add(box)
                log.warning("could not measure box %s: %r", box, exc)


def measure_box(ray: Any, box: str, timeout_s: float = 600.0) -> BoxProfile:
    """A box's planner profile, measured on that box (cached there)."""
    from edgemesh.router.profiles import MeshBox, measure_profiles

    return measure_profiles(ray, [MeshBox(box, "", "", False)], timeout_s)[0]
