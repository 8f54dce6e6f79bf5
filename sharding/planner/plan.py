"""The partitioner: which box runs which layers, on which backend and precision.

``plan(manifest, boxes, links, options)`` is pure (no I/O, no clock) and
deterministic: boxes are sorted by id and every tie has a fixed winner.

Throughput (the default) is solved in two passes over the same tables:
1. minimise the bottleneck, the slowest stage incl. its outgoing link;
2. among chains whose every stage stays within that bottleneck, minimise the
   sum of stage times (fewer hops, faster boxes: lower single-stream latency);
then, with ``prefer_accuracy``, each stage takes the most accurate allowed
precision that still keeps it within the bottleneck (same tokens/s, less
quantisation). The latency objective minimises the sum directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemesh.backends.base import PRECISIONS, LayerRange
from edgemesh.errors import PlanError
from edgemesh.sharding.package.manifest import Manifest
from edgemesh.sharding.planner.baselines import Baseline, evaluate_baselines
from edgemesh.sharding.planner.boxes import BoxProfile, Link, as_boxes, as_links
from edgemesh.sharding.planner.costs import INF, CostModel, PlanOptions
from edgemesh.sharding.planner.solver import Chain, solve

TIE = 1e-12
"""Relative slack when a pass must stay within a figure the previous pass found."""
MOVE_WEIGHT_MS = 1e6
"""Score of one moved layer in a re-plan: more than any plan's summed stage time."""


@dataclass(frozen=True)
class Stage:
    """One box's share of the model. Times are ms per token; memory in bytes."""

    box: str
    layers: LayerRange
    backend: str
    precision: str
    predicted_ms: float
    """compute_ms + link_ms: what this stage contributes to the bottleneck."""
    compute_ms: float
    link_ms: float
    """Sending the hidden state to ``next_box`` (0 on the last stage)."""
    next_box: str | None
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    memory_bytes: int
    memory_limit_bytes: int
    usable_bytes: int
    cost_source: str = "roofline"
    """``"calibrated"``: priced from the box's timings of this model, else the roofline."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": self.box,
            "layers": [self.layers.start, self.layers.stop],
            "backend": self.backend,
            "precision": self.precision,
            "predicted_ms": self.predicted_ms,
            "compute_ms": self.compute_ms,
            "link_ms": self.link_ms,
            "next_box": self.next_box,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "overhead_bytes": self.overhead_bytes,
            "memory_bytes": self.memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "usable_bytes": self.usable_bytes,
            "cost_source": self.cost_source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stage:
        start, stop = d["layers"]
        return cls(
            box=d["box"],
            layers=LayerRange(int(start), int(stop)),
            backend=d["backend"],
            precision=d["precision"],
            predicted_ms=float(d["predicted_ms"]),
            compute_ms=float(d.get("compute_ms", d["predicted_ms"])),
            link_ms=float(d.get("link_ms", 0.0)),
            next_box=d.get("next_box"),
            weight_bytes=int(d.get("weight_bytes", 0)),
            kv_bytes=int(d.get("kv_bytes", 0)),
            overhead_bytes=int(d.get("overhead_bytes", 0)),
            memory_bytes=int(d.get("memory_bytes", 0)),
            memory_limit_bytes=int(d.get("memory_limit_bytes", 0)),
            usable_bytes=int(d.get("usable_bytes", 0)),
            cost_source=str(d.get("cost_source", "roofline")),
        )


@dataclass(frozen=True)
class LeftOut:
    box: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"box": self.box, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """A placement and its predicted speed (see ``docs/PLANNER.md``)."""

    model: str
    num_layers: int
    objective: str
    context: int
    sequences: int
    stages: tuple[Stage, ...]
    bottleneck_ms: float
    latency_ms: float
    left_out: tuple[LeftOut, ...] = ()
    baselines: tuple[Baseline, ...] = ()
    options: PlanOptions = field(default_factory=PlanOptions)
    solver: str = "exact"
    moved_layers: int | None = None
    """Layers whose (box, backend, precision) changed, when this is a re-plan."""

    @property
    def predicted_tokens_per_s(self) -> float:
        """Tokens/s with enough sequences in flight to fill the pipeline."""
        return 1000.0 / self.bottleneck_ms

    @property
    def single_stream_tokens_per_s(self) -> float:
        return 1000.0 / self.latency_ms

    @property
    def tokens_per_s_at_sequences(self) -> float:
        """With ``sequences`` in flight at most that many tokens are in the
        pipeline at once, so a long chain cannot always run at its bottleneck."""
        return min(self.predicted_tokens_per_s, self.sequences * self.single_stream_tokens_per_s)

    def assignment(self) -> list[tuple[str, str, str]]:
        """(box, backend, precision) of each layer, in layer order."""
        out: list[tuple[str, str, str]] = []
        for stage in self.stages:
            out.extend([(stage.box, stage.backend, stage.precision)] * len(stage.layers))
        return out

    def baseline(self, name: str) -> Baseline:
        for b in self.baselines:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "objective": self.objective,
            "context": self.context,
            "sequences": self.sequences,
            "solver": self.solver,
            "stages": [s.to_dict() for s in self.stages],
            "bottleneck_ms": self.bottleneck_ms,
            "latency_ms": self.latency_ms,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "single_stream_tokens_per_s": self.single_stream_tokens_per_s,
            "tokens_per_s_at_sequences": self.tokens_per_s_at_sequences,
            "left_out": [x.to_dict() for x in self.left_out],
            "baselines": {b.name: b.to_dict(self.bottleneck_ms) for b in self.baselines},
            "options": self.options.to_dict(),
            "moved_layers": self.moved_layers,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        try:
            return cls(
                model=d["model"],
                num_layers=int(d["num_layers"]),
                objective=d["objective"],
                context=int(d["context"]),
                sequences=int(d["sequences"]),
                stages=tuple(Stage.from_dict(s) for s in d["stages"]),
                bottleneck_ms=float(d["bottleneck_ms"]),
                latency_ms=float(d["latency_ms"]),
                left_out=tuple(LeftOut(x["box"], x["reason"]) for x in d.get("left_out", [])),
                baselines=tuple(
                    Baseline.from_dict(name, b) for name, b in d.get("baselines", {}).items()
                ),
                options=PlanOptions.from_dict(d.get("options", {})),
                solver=d.get("solver", "exact"),
                moved_layers=d.get("moved_layers"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan: {exc}") from exc


def plan(
    manifest: Manifest,
    boxes: list[BoxProfile] | list[dict[str, Any]],
    links: list[Link] | list[dict[str, Any]] | None = None,
    options: PlanOptions | None = None,
) -> Plan:
    """The best placement of ``manifest`` on ``boxes``.

    Raises ``InfeasiblePlanError`` (with the shortfall and where) when
    nothing fits, ``PlanError`` when there are no boxes.
    """
    if not boxes:
        raise PlanError("no boxes to plan for")
    model = CostModel(manifest, as_boxes(boxes), as_links(links), options)
    chain, choice, solver = optimize(model)
    return assemble(model, chain, choice, solver)


# -- the passes --------------------------------------------------------------


def score_tables(
    model: CostModel,
    cap: float = INF,
    moved: list[np.ndarray] | None = None,
    move_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score[b, c, j, k], last[b, j], option choice[b, c or n, j, k]).

    A stage's score is its time incl. the outgoing link, plus
    ``move_weight`` per moved layer; a stage over ``cap`` scores inf.
    ``choice[b, n]`` is for the last stage (no link).
    """
    n, width = len(model.boxes), model.num_layers + 1
    score = np.full((n, n + 1, width, width), INF)
    choice = np.zeros((n, n + 1, width, width), dtype=np.int16)
    for b, costs in enumerate(model.costs):
        if not costs.options:
            continue
        times = np.stack([o.time for o in costs.options])  # [O, L+1, L+1]
        extra = 0.0 if moved is None else move_weight * moved[b]
        for c in range(n + 1):
            if c == b:
                continue
            total = times + (model.link_ms[b, c] if c < n else 0.0)
            s = np.where(total <= cap, total + extra, INF)
            score[b, c], choice[b, c] = s.min(axis=0), s.argmin(axis=0)
    return score[:, :n], score[:, n, :, width - 1], choice


def optimize(
    model: CostModel, moved: list[np.ndarray] | None = None, tolerance: float = TIE
) -> tuple[Chain, np.ndarray, str]:
    """Run the passes for the objective; raise InfeasiblePlanError if nothing fits.

    With ``moved`` (a re-plan, throughput), pass 2 keeps every stage within
    ``(1 + tolerance) ×`` the best bottleneck and minimises moved layers
    first, summed time second. The latency objective's re-plan lives in
    ``replan.py``.
    """
    from edgemesh.sharding.planner.explain import diagnose_infeasible

    order = model.by_memory()
    if model.options.objective == "latency":
        score, last, choice = score_tables(model)
        chain, solver = solve(score, last, "sum", order)
        if chain is None:
            raise diagnose_infeasible(model)
        return chain, choice, solver
    score, last, _ = score_tables(model)
    first, solver = solve(score, last, "max", order)
    if first is None:
        raise diagnose_infeasible(model)
    cap = first.value * (1 + max(tolerance, TIE))
    weight = MOVE_WEIGHT_MS if moved is not None else 0.0
    score, last, choice = score_tables(model, cap, moved, weight)
    chain, _ = solve(score, last, "sum", order)
    assert chain is not None  # pass 1's chain is within the cap
    return chain, choice, solver


# One chosen stage: box, first layer, stop layer, next box (-1: none), option, link ms.
_Pick = tuple[int, int, int, int, int, float]


def assemble(
    model: CostModel,
    chain: Chain,
    choice: np.ndarray,
    solver: str,
    moved: list[np.ndarray] | None = None,
) -> Plan:
    """Turn a solved chain into a Plan: options, accuracy upgrades, reasons, baselines."""
    from edgemesh.sharding.planner.explain import left_out_reason

    n = len(model.boxes)
    picks: list[_Pick] = []
    for b, j, k, c in chain.stages:
        o = int(choice[b, c if c >= 0 else n, j, k])
        link = float(model.link_ms[b, c]) if c >= 0 else 0.0
        picks.append((b, j, k, c, o, link))
    bottleneck = max(model.costs[b].options[o].time[j, k] + link for b, j, k, c, o, link in picks)
    if model.options.objective == "throughput" and model.options.prefer_accuracy:
        picks = [
            (b, j, k, c, _most_accurate(model, (b, j, k, c, o, link), bottleneck, moved), link)
            for b, j, k, c, o, link in picks
        ]

    stages = []
    for b, j, k, c, o, link in picks:
        opt = model.costs[b].options[o]
        mem = model.memory_breakdown(b, o, j, k)
        compute = float(opt.time[j, k])
        stages.append(
            Stage(
                box=model.boxes[b].id,
                layers=LayerRange(j, k),
                backend=opt.backend,
                precision=opt.precision,
                predicted_ms=compute + float(link),
                compute_ms=compute,
                link_ms=float(link),
                next_box=model.boxes[c].id if c >= 0 else None,
                weight_bytes=mem["weights"],
                kv_bytes=mem["kv"],
                overhead_bytes=mem["overhead"],
                memory_bytes=mem["total"],
                memory_limit_bytes=opt.limit_bytes,
                usable_bytes=int(opt.usable_bytes),
                cost_source=opt.source,
            )
        )
    used = {b for b, *_ in picks}
    plan_bottleneck = max(s.predicted_ms for s in stages)
    plan_latency = sum(s.predicted_ms for s in stages)
    left_out = tuple(
        LeftOut(model.boxes[b].id, left_out_reason(model, b, plan_bottleneck, plan_latency, solver))
        for b in range(n)
        if b not in used
    )
    moved_layers = None
    if moved is not None:
        moved_layers = int(sum(moved[b][o][j, k] for b, j, k, c, o, link in picks))
    return Plan(
        model=model.manifest.name,
        num_layers=model.num_layers,
        objective=model.options.objective,
        context=model.context,
        sequences=model.sequences,
        stages=tuple(stages),
        bottleneck_ms=plan_bottleneck,
        latency_ms=plan_latency,
        left_out=left_out,
        baselines=evaluate_baselines(model),
        options=model.options,
        solver=solver,
        moved_layers=moved_layers,
    )


def _most_accurate(
    model: CostModel, pick: _Pick, bottleneck: float, moved: list[np.ndarray] | None
) -> int:
    """The option for a stage that keeps it within the bottleneck and moves
    the fewest layers, then is the most accurate, then the best backend."""
    b, j, k, _c, current, link = pick
    best_key, best = None, current
    for o, opt in enumerate(model.costs[b].options):
        if not opt.feasible[j, k] or opt.time[j, k] + link > bottleneck * (1 + TIE):
            continue
        key = (
            0 if moved is None else int(moved[b][o][j, k]),
            PRECISIONS.index(opt.precision),
            o,
        )
        if best_key is None or key < best_key:
            best_key, best = key, o
    return best


def whole_model_backends() -> tuple[str, ...]:
    """Known backends that cannot run a partial layer range (from their capabilities).

    For ``PlanOptions.whole_model_only``; reads the backend registry, which
    imports backend modules but no runtime.
    """
    from edgemesh.backends.registry import all_backends

    return tuple(
        name for name, cls in all_backends().items() if not cls.capabilities.partial_ranges
    )
