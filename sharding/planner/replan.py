"""Re-planning when boxes join or leave: a pure function of (old plan, new membership).

Moving a layer costs a weight transfer, a load and a KV-cache rebuild, so a
re-plan trades a little predicted speed for fewer moves. A layer *moves*
when its (box, backend, precision) differs from the old plan.

Rule, throughput objective: among plans whose every stage (incl. its link)
stays within ``(1 + replan_tolerance) ×`` the best bottleneck for the new
membership, take the one that moves the fewest layers; ties go to the lower
summed time. Exact (same dynamic program as ``plan``, with the move count
weighted above any time).

Rule, latency objective: the budget is on a sum, which the stage-wise
program cannot cap, so the re-plan minimises ``latency + λ · moved`` and
takes the largest λ (bisection) whose plan stays within
``(1 + replan_tolerance) ×`` the best latency. This finds the fewest moves
among plans on the lower convex hull of (latency, moves): exact on that
hull, possibly missing a plan inside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgemesh.errors import PlanError
from edgemesh.sharding.package.manifest import Manifest
from edgemesh.sharding.planner.boxes import BoxProfile, Link, as_boxes, as_links
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import Plan, assemble, optimize, score_tables
from edgemesh.sharding.planner.solver import Chain, solve

BISECTION_STEPS = 40


def moved_tables(model: CostModel, old: Plan) -> list[np.ndarray]:
    """Per box, ``[option, j, k]`` -> layers of ``[j, k)`` that would move there."""
    before = old.assignment()
    n = model.num_layers
    j = np.arange(n + 1)[:, None]
    k = np.arange(n + 1)[None, :]
    tables = []
    for b, costs in enumerate(model.costs):
        per_option = []
        for opt in costs.options:
            here = (model.boxes[b].id, opt.backend, opt.precision)
            kept = np.array([1.0 if a == here else 0.0 for a in before])
            prefix = np.concatenate([[0.0], np.cumsum(kept)])
            per_option.append(np.maximum(k - j, 0) - np.maximum(prefix[k] - prefix[j], 0))
        tables.append(np.stack(per_option) if per_option else np.zeros((0, n + 1, n + 1)))
    return tables


def replan(
    old: Plan,
    manifest: Manifest,
    boxes: list[BoxProfile] | list[dict[str, Any]],
    links: list[Link] | list[dict[str, Any]] | None = None,
    options: PlanOptions | None = None,
) -> Plan:
    """A plan for the new set of ``boxes`` that keeps as much of ``old`` as the tolerance allows.

    ``options`` default to the old plan's. Raises ``PlanError`` if ``old``
    is for another model, ``InfeasiblePlanError`` if nothing fits.
    """
    if old.model != manifest.name or old.num_layers != manifest.num_layers:
        raise PlanError(
            f"the old plan is for '{old.model}' ({old.num_layers} layers), "
            f"not '{manifest.name}' ({manifest.num_layers} layers)"
        )
    if not boxes:
        raise PlanError("no boxes to re-plan for")
    options = options or old.options
    model = CostModel(manifest, as_boxes(boxes), as_links(links), options)
    moved = moved_tables(model, old)
    if options.objective == "throughput":
        chain, choice, solver = optimize(model, moved, options.replan_tolerance)
        return assemble(model, chain, choice, solver, moved)

    best, choice, solver = optimize(model)  # λ = 0: the best latency, or the infeasible error
    budget = best.value * (1 + options.replan_tolerance)
    order = model.by_memory()

    def at(lam: float) -> tuple[Chain, np.ndarray, float]:
        score, last, ch = score_tables(model, moved=moved, move_weight=lam)
        chain, _ = solve(score, last, "sum", order)
        assert chain is not None  # the λ = 0 chain is finite, so every λ has one
        latency = chain.value - lam * _moves(chain, ch, moved, len(model.boxes))
        return chain, ch, latency

    # Above budget - best, one move outweighs any latency gap between two
    # plans within budget: if that λ's plan is within budget, nothing moves less.
    lo, hi = 0.0, budget + 1.0
    chain, chosen = best, choice
    top_chain, top_choice, top_latency = at(hi)
    if top_latency <= budget:
        chain, chosen = top_chain, top_choice
    else:
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            c, ch, latency = at(mid)
            if latency <= budget:
                lo, chain, chosen = mid, c, ch
            else:
                hi = mid
    return assemble(model, chain, chosen, solver, moved)


def _moves(chain: Chain, choice: np.ndarray, moved: list[np.ndarray], n: int) -> float:
    total = 0.0
    for b, j, k, c in chain.stages:
        o = int(choice[b, c if c >= 0 else n, j, k])
        total += float(moved[b][o][j, k])
    return total
