"""Where the stages go: from a plan to stage specs, and again after a box is lost.

A ``Placer`` answers two questions for the ``RayPipeline``: the stages to
start with, and the stages to continue with when only ``alive`` boxes are
left. ``PlanPlacer`` re-plans with ``edgemesh.sharding.planner.replan`` (few moved
layers); when nothing fits it raises ``ModelUnavailableError`` (HTTP 503)
carrying the planner's numbers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from edgemesh.errors import ConfigError, ModelUnavailableError, PlanError
from edgemesh.mesh.deployment_record import JSONObject
from edgemesh.router.stage import StageSpec, wire_dtype

if TYPE_CHECKING:
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.boxes import BoxProfile, Link
    from edgemesh.sharding.planner.plan import Plan

log = logging.getLogger(__name__)


REPLAN_MARGIN = 0.15
"""A box that joins is used only if the new plan's bottleneck is at least
this much (relative) below the current one: moving stages costs a pause
(every live sequence is replayed), so small gains are not worth the churn."""


class Placer(Protocol):
    def initial(self) -> list[StageSpec]: ...

    def after_loss(self, alive: set[str]) -> list[StageSpec]:
        """Stages over the ``alive`` boxes; raises ``ModelUnavailableError``."""
        ...

    def after_join(self, alive: set[str]) -> list[StageSpec] | None:
        """Better stages now that ``alive`` boxes are up, or None to stay."""
        ...


def with_wires(specs: Sequence[StageSpec]) -> list[StageSpec]:
    """Set each stage's outgoing wire dtype from its and the next stage's precision."""
    out = list(specs)
    for i, (a, b) in enumerate(itertools.pairwise(specs)):
        out[i] = replace(a, wire=wire_dtype(a.precision, b.precision))
    return out


class StaticPlacer:
    """Fixed stages (``--cuts``-style, tests, benchmarks): after a loss the
    same stages restart if their boxes live, else the model is unavailable."""

    def __init__(self, specs: Sequence[StageSpec]) -> None:
        self.specs = with_wires(specs)

    def initial(self) -> list[StageSpec]:
        return list(self.specs)

    def after_loss(self, alive: set[str]) -> list[StageSpec]:
        gone = sorted({s.box for s in self.specs} - alive)
        if gone:
            raise ModelUnavailableError(
                f"box(es) {', '.join(gone)} left and this deployment has fixed stages",
                hint="deploy with a plan so the mesh can re-plan, or bring the box back",
            )
        return list(self.specs)

    def after_join(self, alive: set[str]) -> list[StageSpec] | None:
        return None  # fixed stages never move


class PlanPlacer:
    """Stages from a planner ``Plan``; re-plans over the boxes still alive."""

    def __init__(
        self,
        manifest: Manifest,
        plan: Plan,
        profiles: Sequence[BoxProfile] | Sequence[JSONObject],
        links: Sequence[Link] | Sequence[JSONObject] | None = None,
        *,
        package_dir: str = "",
        origin_box: str | None = None,
        stage_defaults: dict[str, Any] | None = None,
    ) -> None:
        from edgemesh.sharding.planner.boxes import BoxProfile, Link

        self.manifest = manifest
        # ``package_dir`` is a path on ``origin_box``; elsewhere it means
        # nothing, so other boxes fetch their artifacts (no shared filesystem).
        self.origin_box = origin_box
        self.plan = plan
        # Profiles given as JSON (a ``--boxes`` file, a test) are parsed here, once.
        self.profiles = [
            p if isinstance(p, BoxProfile) else BoxProfile.from_dict(p) for p in profiles
        ]
        self.links = [ln if isinstance(ln, Link) else Link.from_dict(ln) for ln in links or []]
        self.package_dir = package_dir
        self.stage_defaults = dict(stage_defaults or {})
        self.margin = REPLAN_MARGIN
        self.excluded: frozenset[str] = frozenset()
        """Drained boxes (the dashboard's Drain): left out of every re-plan,
        after a join or a loss alike, even while they stay alive."""
        self._considered = frozenset(self.profiled()) | {st.box for st in plan.stages}
        """Boxes the current plan was chosen from (a join re-plans only when this
        grows): every box profiled at deploy time, including those the plan left
        out on purpose, so they do not count as new joins seconds later."""

    def specs(self, plan: Plan) -> list[StageSpec]:
        return with_wires(
            [
                StageSpec(
                    index=i,
                    box=st.box,
                    start=st.layers.start,
                    stop=st.layers.stop,
                    num_layers=plan.num_layers,
                    backend=st.backend,
                    precision=st.precision,
                    package_dir=(self.package_dir if self.origin_box in (None, st.box) else ""),
                    **self.stage_defaults,
                )
                for i, st in enumerate(plan.stages)
            ]
        )

    def initial(self) -> list[StageSpec]:
        return self.specs(self.plan)

    def add_profile(self, profile: BoxProfile) -> None:
        """Know a box that was not profiled at deploy time (measured on joining)."""
        self.profiles = [p for p in self.profiles if p.id != profile.id]
        self.profiles.append(profile)

    def profiled(self) -> set[str]:
        return {p.id for p in self.profiles}

    def exclude(self, boxes: set[str] | frozenset[str]) -> None:
        """Leave ``boxes`` (drained) out of later plans; an empty set undrains."""
        self.excluded = frozenset(boxes)

    def adopt(self, plan: Plan) -> list[StageSpec]:
        """Make ``plan`` the current one (a re-plan applied from the dashboard);
        returns its stages for ``RayPipeline.move``."""
        self.plan = plan
        self._considered = frozenset(self.profiled() - self.excluded) | {
            st.box for st in plan.stages
        }
        return self.specs(plan)

    def after_join(self, alive: set[str]) -> list[StageSpec] | None:
        """A re-plan over every ``alive`` profiled box, adopted only when its
        bottleneck beats the current plan's by ``margin`` (see ``REPLAN_MARGIN``);
        among plans within the planner's tolerance it moves the fewest layers."""
        from edgemesh.sharding.planner.replan import replan

        ids = frozenset((alive - self.excluded) & self.profiled())
        if ids <= self._considered:
            self._considered = ids | frozenset(st.box for st in self.plan.stages)
            return None  # nothing new (or only departures, which after_loss handles)
        self._considered = ids
        if not all(st.box in ids for st in self.plan.stages):
            return None  # a stage's box is gone: the loss path re-plans
        left, links = self._over(ids)
        try:
            plan = replan(self.plan, self.manifest, left, links)
        except PlanError as exc:
            log.info("no re-plan for '%s' over %s: %s", self.manifest.name, sorted(ids), exc)
            return None
        gain = 1.0 - plan.bottleneck_ms / self.plan.bottleneck_ms
        if gain < self.margin:
            log.info(
                "'%s': a re-plan over %s would gain %.0f%% (< %.0f%%): staying",
                self.manifest.name,
                sorted(ids),
                100 * gain,
                100 * self.margin,
            )
            return None
        log.info(
            "'%s': re-planned over %s: %s (%.0f%% faster, moved %s layers)",
            self.manifest.name,
            sorted(ids),
            [(s.box, str(s.layers)) for s in plan.stages],
            100 * gain,
            plan.moved_layers,
        )
        self.plan = plan
        return self.specs(plan)

    def _over(self, ids: set[str] | frozenset[str]) -> tuple[list[BoxProfile], list[Link]]:
        left = [p for p in self.profiles if p.id in ids]
        return left, [ln for ln in self.links if {ln.a, ln.b} <= set(ids)]

    def after_loss(self, alive: set[str]) -> list[StageSpec]:
        alive = alive - self.excluded
        if all(st.box in alive for st in self.plan.stages):
            return self.specs(self.plan)
        from edgemesh.sharding.planner.replan import replan

        left = [p for p in self.profiles if p.id in alive]
        if not left:
            raise ModelUnavailableError(
                f"no box of the mesh is left to run '{self.manifest.name}'",
                hint="bring a box back; the model will not be served until then",
            )
        ids = {p.id for p in left}
        self._considered = frozenset(ids)
        left, links = self._over(ids)
        try:
            plan = replan(self.plan, self.manifest, left, links)
        except PlanError as exc:
            raise ModelUnavailableError(
                f"the remaining boxes ({', '.join(sorted(ids))}) cannot hold "
                f"'{self.manifest.name}': {exc}",
                hint="add a box with enough memory, or deploy a smaller precision",
            ) from exc
        log.info(
            "re-planned '%s' over %s: %s (moved %s layers)",
            self.manifest.name,
            sorted(ids),
            [(s.box, str(s.layers)) for s in plan.stages],
            plan.moved_layers,
        )
        self.plan = plan
        return self.specs(plan)


def checked_plan(doc: JSONObject, manifest: Manifest, boxes: set[str]) -> Plan:
    """A given plan, refused when it is for another model or names absent boxes."""
    from edgemesh.sharding.planner.plan import Plan

    placed = Plan.from_dict(doc)
    if placed.model != manifest.name or placed.num_layers != manifest.num_layers:
        raise ConfigError(
            f"the plan is for '{placed.model}' ({placed.num_layers} layers), not "
            f"'{manifest.name}' ({manifest.num_layers} layers)"
        )
    absent = sorted({st.box for st in placed.stages} - boxes)
    if absent:
        raise ConfigError(
            f"the plan places layers on boxes not in the mesh: {', '.join(absent)}",
            hint="run `edgemesh status` to list the boxes, or drop --plan",
        )
    return placed
