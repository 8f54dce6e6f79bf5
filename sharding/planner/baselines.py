"""Naive splits the planner is measured against, under the same cost model.

* **memory-proportional** (what exo does): every box that can run the model
  gets layers in proportion to its memory limit;
* **equal**: every such box gets the same number of layers.

Both keep the boxes in ``CostModel.by_memory()`` order (most memory first)
and run each box on its best backend at its default precision: the
fingerprint's ``precision`` when the model allows it there, else that
backend's fastest allowed precision. A split that does not fit, or that gives
a partial range to a whole-model backend, has an infinite bottleneck and a
reason. Layer counts are cumulative rounding of the shares, so they add up
to the model's layers; a box whose share rounds to 0 gets no stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemesh.sharding.planner.costs import INF
from edgemesh.sharding.planner.explain import fmt_bytes

if TYPE_CHECKING:
    from edgemesh.sharding.planner.costs import CostModel

NAMES = ("memory_proportional", "equal")


@dataclass(frozen=True)
class Baseline:
    """A naive split and its predicted figures (inf when it does not fit)."""

    name: str
    bottleneck_ms: float
    latency_ms: float
    stages: tuple[tuple[str, int, int, str, str], ...]
    """(box, start, stop, backend, precision) per stage."""
    reason: str | None = None

    @property
    def feasible(self) -> bool:
        return math.isfinite(self.bottleneck_ms)

    def to_dict(self, plan_bottleneck_ms: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bottleneck_ms": self.bottleneck_ms if self.feasible else None,
            "latency_ms": self.latency_ms if self.feasible else None,
            "feasible": self.feasible,
            "reason": self.reason,
            "stages": [
                {"box": box, "layers": [start, stop], "backend": backend, "precision": precision}
                for box, start, stop, backend, precision in self.stages
            ],
        }
        if plan_bottleneck_ms is not None:
            # > 1: the plan is that many times faster than this split.
            d["plan_speedup"] = self.bottleneck_ms / plan_bottleneck_ms if self.feasible else None
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Baseline:
        return cls(
            name=name,
            bottleneck_ms=INF if d.get("bottleneck_ms") is None else float(d["bottleneck_ms"]),
            latency_ms=INF if d.get("latency_ms") is None else float(d["latency_ms"]),
            stages=tuple(
                (s["box"], int(s["layers"][0]), int(s["layers"][1]), s["backend"], s["precision"])
                for s in d.get("stages", [])
            ),
            reason=d.get("reason"),
        )


def default_option(model: CostModel, b: int) -> int | None:
    """Index of box ``b``'s default option (see the module docstring), or None."""
    options = model.costs[b].options
    if not options:
        return None
    best_backend = options[0].backend
    mine = [o for o, opt in enumerate(options) if opt.backend == best_backend]
    wanted = model.boxes[b].default_precision
    for o in mine:
        if options[o].precision == wanted:
            return o
    # Fastest per token over all layers; ties keep the more accurate (listed first).
    return min(
        mine, key=lambda o: float(model.layer_ms(options[o].rate, options[o].precision).sum())
    )


def split_counts(shares: list[float], num_layers: int) -> list[int]:
    """Layers per share by cumulative rounding (half up); they sum to ``num_layers``."""
    total = sum(shares)
    counts, done, prev = [], 0.0, 0
    for share in shares:
        done += share
        stop = math.floor(num_layers * done / total + 0.5)
        counts.append(stop - prev)
        prev = stop
    return counts


def evaluate_split(model: CostModel, name: str, boxes: list[int], counts: list[int]) -> Baseline:
    """Figures of running ``counts[i]`` layers on ``boxes[i]``, in that order."""
    placed = [(b, n) for b, n in zip(boxes, counts, strict=True) if n > 0]
    stages, times, reason = [], [], None
    start = 0
    for i, (b, n) in enumerate(placed):
        o = default_option(model, b)
        assert o is not None  # callers pass boxes that have options
        opt = model.costs[b].options[o]
        stop = start + n
        box_id = model.boxes[b].id
        stages.append((box_id, start, stop, opt.backend, opt.precision))
        if not opt.feasible[start, stop] and reason is None:
            need = opt.memory[start, stop]
            if need > opt.usable_bytes:
                reason = (
                    f"stage on box {box_id} needs {fmt_bytes(need)} for {n} layer"
                    f"{'s' if n > 1 else ''} at {opt.precision} but only "
                    f"{fmt_bytes(opt.usable_bytes)} is usable"
                )
            else:
                reason = f"{opt.backend} on box {box_id} runs whole models only"
        link = model.link_ms[b, placed[i + 1][0]] if i + 1 < len(placed) else 0.0
        times.append(float(opt.time[start, stop]) + float(link))
        start = stop
    if reason is not None or not stages:
        return Baseline(name, INF, INF, tuple(stages), reason or "no box can run the model")
    return Baseline(name, max(times), sum(times), tuple(stages))


def evaluate_baselines(model: CostModel) -> tuple[Baseline, ...]:
    """The memory-proportional and equal splits of the model on all usable boxes."""
    boxes = [b for b in model.by_memory() if model.costs[b].options]
    memory = []
    for b in boxes:
        o = default_option(model, b)
        assert o is not None
        memory.append(float(model.costs[b].options[o].limit_bytes))
    L = model.num_layers
    return (
        evaluate_split(
            model, "memory_proportional", boxes, split_counts(memory, L) if boxes else []
        ),
        evaluate_split(model, "equal", boxes, split_counts([1.0] * len(boxes), L)),
    )
