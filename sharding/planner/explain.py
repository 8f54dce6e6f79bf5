"""Words for the planner's numbers: why a box was left out, why nothing fits,
and the table ``edgemesh plan`` prints. Sizes are decimal (1 GB = 1e9 B)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgemesh.errors import InfeasiblePlanError

if TYPE_CHECKING:
    from edgemesh.sharding.package.manifest import LayerCost
    from edgemesh.sharding.planner.costs import CostModel, Option
    from edgemesh.sharding.planner.plan import Plan

HINT = "add a box, lower --context or --sequences, or allow more quantisation (--max-accuracy-loss)"


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.0f} MB"


def _lightest_stage(model: CostModel, opt: Option) -> tuple[float, int, int]:
    """(bytes, start, stop) of the smallest stage this option could be asked to hold."""
    valid = np.triu(np.ones_like(opt.memory, dtype=bool), k=1)
    if opt.backend in model.options.whole_model_only:
        n = model.num_layers
        return float(opt.memory[0, n]), 0, n
    mem = np.where(valid, opt.memory, np.inf)
    j, k = np.unravel_index(int(np.argmin(mem)), mem.shape)
    return float(mem[j, k]), int(j), int(k)


def _no_options_reason(model: CostModel, b: int) -> str:
    box = model.boxes[b]
    refused = model.costs[b].refused
    if refused:
        return "no allowed backend/precision: " + "; ".join(refused)
    if not box.compute:
        return "no compute figures (run `edgemesh info --json --measure` on it)"
    listed = ", ".join(box.backends) or "none"
    return f"its compute figures name no backend it lists (backends: {listed})"


def too_small_reason(model: CostModel, b: int) -> str | None:
    """Why box ``b`` cannot hold even its lightest stage, or None if it can."""
    costs = model.costs[b]
    if any(opt.feasible.any() for opt in costs.options):
        return None
    # The option that comes closest to fitting is the one worth showing.
    opt = min(costs.options, key=lambda o: _lightest_stage(model, o)[0] - o.usable_bytes)
    need, j, k = _lightest_stage(model, opt)
    o = costs.options.index(opt)
    parts = model.memory_breakdown(b, o, j, k)
    what = "the whole model" if k - j == model.num_layers else f"{k - j} layer"
    what += "s" if 1 < k - j < model.num_layers else ""
    return (
        f"too small for any layer: {what} at {opt.key} needs {fmt_bytes(need)} "
        f"(weights {fmt_bytes(parts['weights'])} + KV {fmt_bytes(parts['kv'])} + runtime "
        f"{fmt_bytes(parts['overhead'])}) but only {fmt_bytes(opt.usable_bytes)} of its "
        f"{fmt_bytes(opt.limit_bytes)} limit is usable (headroom {model.options.headroom:.0%})"
    )


def left_out_reason(
    model: CostModel, b: int, bottleneck_ms: float, latency_ms: float, solver: str
) -> str:
    """One sentence, with numbers, on why box ``b`` has no stage."""
    if not model.costs[b].options:
        return _no_options_reason(model, b)
    small = too_small_reason(model, b)
    if small is not None:
        return small
    singles = [float(np.min(np.diagonal(o.time, offset=1))) for o in model.costs[b].options]
    if np.isfinite(min(singles)):
        alone = f"one layer takes it {min(singles):.3f} ms, plus a link hop"
    else:  # whole-model backends only
        whole = min(float(o.time[0, model.num_layers]) for o in model.costs[b].options)
        alone = f"the whole model takes it {whole:.3f} ms"
    searched = "no plan using it" if solver == "exact" else "no plan in the searched order"
    if model.options.objective == "latency":
        figure = f"a lower latency than {latency_ms:.3f} ms/token"
    else:
        figure = f"a lower bottleneck than {bottleneck_ms:.3f} ms/token"
    return f"not needed: {searched} has {figure} ({alone})"


def diagnose_infeasible(model: CostModel) -> InfeasiblePlanError:
    """The error for a model that fits on no chain of these boxes: by how much and where."""
    m = model.manifest
    L = model.num_layers
    usable = [b for b in range(len(model.boxes)) if model.costs[b].options]
    if not usable:
        why = "; ".join(
            f"{model.boxes[b].id}: {_no_options_reason(model, b)}" for b in range(len(model.boxes))
        )
        return InfeasiblePlanError(f"no box can run model '{m.name}': {why}", hint=HINT)

    # A lower bound on what the model needs: every block at the lightest
    # allowed precision some box can run, one runtime overhead.
    precisions = sorted({opt.precision for b in usable for opt in model.costs[b].options})

    def whole_model(p: str) -> float:
        weights = sum(int(c.weight_bytes[p]) for c in m.layers)
        weights += _weight(m.embedding, p) + _weight(m.head, p)
        return weights + float(model.kv_bytes(p).sum()) + model.options.runtime_overhead_bytes

    need, lightest = min((whole_model(p), p) for p in precisions)
    kv = float(model.kv_bytes(lightest).sum())
    have = {model.boxes[b].id: max(o.usable_bytes for o in model.costs[b].options) for b in usable}
    capacity = ", ".join(
        f"{box_id} {fmt_bytes(v)} ({_max_layers(model, model.index(box_id))} layers)"
        for box_id, v in have.items()
    )
    total = sum(have.values())
    head = (
        f"model '{m.name}' ({L} layers) does not fit: it needs at least {fmt_bytes(need)} "
        f"({fmt_bytes(need - kv - model.options.runtime_overhead_bytes)} of weights at "
        f"{lightest}, {fmt_bytes(kv)} of KV cache for {model.context} tokens × "
        f"{model.sequences} sequences, {fmt_bytes(model.options.runtime_overhead_bytes)} runtime)"
    )
    if need > total:
        return InfeasiblePlanError(
            f"{head} but the {len(have)} usable boxes have {fmt_bytes(total)} in all "
            f"[usable memory, most layers each could hold: {capacity}]: "
            f"short by {fmt_bytes(need - total)}",
            hint=HINT,
        )
    # Enough memory in all, but not in pieces that line up.
    firsts = [b for b in usable if any(o.feasible[0, 1:].any() for o in model.costs[b].options)]
    lasts = [b for b in usable if any(o.feasible[:L, L].any() for o in model.costs[b].options)]
    where = []
    if not firsts:
        emb = fmt_bytes(_weight(m.embedding, lightest))
        where.append(f"no box can hold the embedding ({emb}) with a layer")
    if not lasts:
        where.append(
            f"no box can hold the LM head ({fmt_bytes(_weight(m.head, lightest))}) with a layer"
        )
    fit = sum(_max_layers(model, b) for b in usable)
    where.append(f"at most {min(fit, L)} of {L} layers can be placed at once")
    return InfeasiblePlanError(
        f"{head}; the boxes have {fmt_bytes(total)} usable in all but it cannot be cut to fit: "
        f"{'; '.join(where)} [{capacity}]",
        hint=HINT,
    )


def _weight(cost: LayerCost, precision: str) -> int:
    from edgemesh.sharding.planner.costs import weight_at

    return weight_at(cost, precision)


def _max_layers(model: CostModel, b: int) -> int:
    """Most layers box ``b`` could hold in one stage at any option."""
    best = 0
    for opt in model.costs[b].options:
        j, k = np.nonzero(opt.feasible)
        if len(j):
            best = max(best, int((k - j).max()))
    return best


def render_plan(plan: Plan) -> str:
    """A table a person can read (the JSON carries the same figures)."""
    lines = [
        f"plan for '{plan.model}' ({plan.num_layers} layers), objective {plan.objective}, "
        f"context {plan.context} × {plan.sequences} sequences, "
        f"max accuracy loss {plan.options.max_accuracy_loss:.2f}",
        "",
    ]
    header = (
        "box",
        "layers",
        "backend",
        "precision",
        "weights",
        "KV",
        "memory / usable",
        "ms/token",
        "priced by",
    )
    rows = [header]
    for s in plan.stages:
        link = f" (+{s.link_ms:.2f} link)" if s.next_box else ""
        rows.append(
            (
                s.box,
                str(s.layers),
                s.backend,
                s.precision,
                fmt_bytes(s.weight_bytes),
                fmt_bytes(s.kv_bytes),
                f"{fmt_bytes(s.memory_bytes)} / {fmt_bytes(s.usable_bytes)}",
                f"{s.predicted_ms:.3f}{link}",
                s.cost_source,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    slowest = max(plan.stages, key=lambda s: s.predicted_ms)
    lines += [
        "",
        f"bottleneck {plan.bottleneck_ms:.3f} ms/token on {slowest.box} -> "
        f"{plan.predicted_tokens_per_s:.1f} tokens/s with the pipeline full; "
        f"single stream {plan.single_stream_tokens_per_s:.1f} tokens/s "
        f"({plan.latency_ms:.3f} ms/token); with {plan.sequences} sequences "
        f"{plan.tokens_per_s_at_sequences:.1f} tokens/s",
    ]
    for b in plan.baselines:
        if b.feasible:
            lines.append(
                f"baseline {b.name}: {b.bottleneck_ms:.3f} ms/token "
                f"(this plan is {b.bottleneck_ms / plan.bottleneck_ms:.2f}× faster)"
            )
        else:
            lines.append(f"baseline {b.name}: does not fit ({b.reason})")
    for x in plan.left_out:
        lines.append(f"left out {x.box}: {x.reason}")
    if plan.moved_layers is not None:
        lines.append(f"re-plan moves {plan.moved_layers} of {plan.num_layers} layers")
    return "\n".join(lines)
