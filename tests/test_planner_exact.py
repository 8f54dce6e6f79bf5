"""The planner equals an exhaustive search over contiguous splits, box subsets,
box orders and per-stage precisions, on cases small enough to enumerate."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest

from edgemesh.errors import InfeasiblePlanError
from edgemesh.sharding.package.manifest import LayerCost, Manifest
from edgemesh.sharding.planner.boxes import BoxProfile, Link, parse_boxes
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import plan
from edgemesh.sharding.planner.scenarios import MODELS, SCENARIOS, synthetic_manifest
from edgemesh.sharding.planner.solver import solve_exact, solve_ordered


def all_plans(model: CostModel, every_option: bool = True):
    """Yield (stage times incl. links, [(box, start, stop, option)]) for every feasible plan.

    With ``every_option`` False each stage takes its fastest option (enough
    when the objective only grows with each stage's time) so bigger cases
    stay enumerable.
    """
    n, L = len(model.boxes), model.num_layers
    for r in range(1, n + 1):
        for order in itertools.permutations(range(n), r):
            for cuts in itertools.combinations(range(1, L), r - 1):
                bounds = (0, *cuts, L)
                choices = []
                for i, b in enumerate(order):
                    opts = model.costs[b].options
                    j, k = bounds[i], bounds[i + 1]
                    ok = [o for o, opt in enumerate(opts) if opt.feasible[j, k]]
                    if not every_option and ok:
                        ok = [
                            min(
                                ok,
                                key=lambda o, j=j, k=k, b=b: model.costs[b].options[o].time[j, k],
                            )
                        ]
                    choices.append(ok)
                for picked in itertools.product(*choices):
                    times, stages = [], []
                    for i, (b, o) in enumerate(zip(order, picked, strict=True)):
                        j, k = bounds[i], bounds[i + 1]
                        link = model.link_ms[b, order[i + 1]] if i + 1 < r else 0.0
                        times.append(model.costs[b].options[o].time[j, k] + link)
                        stages.append((b, j, k, o))
                    yield times, stages


def brute_force(model: CostModel, objective: str) -> float:
    agg = max if objective == "throughput" else sum
    return min((agg(times) for times, _ in all_plans(model)), default=math.inf)


def random_case(seed: int) -> tuple[Manifest, list[BoxProfile], list[Link], PlanOptions]:
    """A small model with uneven layers and 1-4 random boxes, some of them cramped."""
    rng = random.Random(seed)
    L = rng.randint(2, 6)
    base = synthetic_manifest(
        f"rand{seed}",
        num_layers=L,
        hidden=256,
        intermediate=768,
        heads=4,
        kv_heads=2,
        head_dim=64,
        vocab=4096,
        accuracy={"fp32": 0.0, "fp16": 0.001, "int8": 0.02, "int4": rng.choice([0.05, 0.2])},
    )
    layers = []
    for _ in range(L):
        f = rng.uniform(0.3, 2.0)
        c = base.layers[0]
        layers.append(
            LayerCost(
                weight_bytes={p: int(v * f) for p, v in c.weight_bytes.items()},
                flops_per_token=int(c.flops_per_token * f),
                kv_bytes_per_token=c.kv_bytes_per_token,
                attn_flops_per_token_per_ctx=c.attn_flops_per_token_per_ctx,
            )
        )
    manifest = dataclasses.replace(base, layers=layers)
    context, sequences = rng.choice([256, 2048]), rng.randint(1, 4)
    # a mid-sized layer's fp16 weights and KV cache: boxes hold a fraction of the model
    per_layer = base.layers[0].weight_bytes["fp16"] + 1024 * context * sequences
    boxes = []
    for i in range(rng.randint(1, 4)):
        precisions = rng.sample(["fp32", "fp16", "int8", "int4"], rng.randint(1, 2))
        compute = {
            f"rt/{p}": {"gflops": rng.uniform(1, 50), "bandwidth_gbps": rng.uniform(0.5, 20)}
            for p in precisions
        }
        boxes.append(
            BoxProfile.from_dict(
                {
                    "id": f"box{i}",
                    "memory_limit_bytes": int(
                        (160e6 + per_layer * rng.uniform(0.5, 0.9 * L)) / 0.9
                    ),
                    "backends": ["rt"],
                    "compute": compute,
                    "link_gbps": rng.choice([None, 0.1, 1.0]),
                    "link_latency_ms": rng.uniform(0.0, 0.5),
                }
            )
        )
    links = []
    if len(boxes) > 1 and rng.random() < 0.5:
        links.append(Link("box0", "box1", rng.uniform(0.05, 5), rng.uniform(0, 3)))
    options = PlanOptions(
        objective=rng.choice(["throughput", "latency"]),
        context=context,
        sequences=sequences,
    )
    return manifest, boxes, links, options


@pytest.mark.parametrize("seed", range(100))
def test_plan_equals_exhaustive_search_on_random_small_cases(seed: int) -> None:
    manifest, boxes, links, options = random_case(seed)
    model = CostModel(manifest, boxes, links, options)
    expected = brute_force(model, options.objective)
    if math.isinf(expected):
        with pytest.raises(InfeasiblePlanError):
            plan(manifest, boxes, links, options)
        return
    result = plan(manifest, boxes, links, options)
    if options.objective == "throughput":
        # max of the same floats: no rounding can differ
        assert result.bottleneck_ms == expected
    else:
        assert result.latency_ms == pytest.approx(expected, rel=1e-12)


def test_the_random_cases_cover_both_outcomes_and_objectives() -> None:
    """Guard the generator: it must produce feasible, infeasible, multi-stage cases."""
    kinds = set()
    for seed in range(100):
        manifest, boxes, links, options = random_case(seed)
        try:
            stages = len(plan(manifest, boxes, links, options).stages)
        except InfeasiblePlanError:
            stages = 0
        kinds.add((options.objective, min(stages, 2)))
    assert {("throughput", 0), ("throughput", 2), ("latency", 0), ("latency", 2)} <= kinds


@pytest.mark.parametrize(
    "name", ["pi5_orin_nuc", "equal_memory_4x_speed", "one_box_too_small", "small_model_pi5_nuc"]
)
@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_plan_equals_exhaustive_search_on_scenarios(name: str, objective: str) -> None:
    scenario = SCENARIOS[name]
    boxes, links = parse_boxes(scenario.boxes_json())
    manifest = MODELS[scenario.model]()
    options = PlanOptions(objective=objective)
    model = CostModel(manifest, boxes, links, options)
    agg = max if objective == "throughput" else sum
    expected = min(agg(t) for t, _ in all_plans(model, every_option=False))
    result = plan(manifest, boxes, links, options)
    got = result.bottleneck_ms if objective == "throughput" else result.latency_ms
    assert got == pytest.approx(expected, rel=1e-12)


def test_exact_solver_is_never_worse_than_any_fixed_order_on_eight_boxes() -> None:
    """8 boxes are too many to enumerate; every fixed order's optimum bounds the exact one."""
    scenario = SCENARIOS["eight_boxes"]
    boxes, links = parse_boxes(scenario.boxes_json())
    model = CostModel(MODELS[scenario.model](), boxes, links, PlanOptions())
    from edgemesh.sharding.planner.plan import score_tables

    score, last, _ = score_tables(model)
    exact = solve_exact(score, last, "max")
    assert exact is not None
    rng = random.Random(7)
    orders = [list(range(8)), model.by_memory()] + [rng.sample(range(8), 8) for _ in range(20)]
    values = [solve_ordered(score, last, "max", order).value for order in orders]
    assert exact.value <= min(values)
    assert exact.value < max(values)  # order matters here, so the search did something


def test_solver_stages_cover_every_layer_once_in_order() -> None:
    scenario = SCENARIOS["eight_boxes"]
    boxes, links = parse_boxes(scenario.boxes_json())
    result = plan(MODELS[scenario.model](), boxes, links)
    starts = [s.layers.start for s in result.stages]
    stops = [s.layers.stop for s in result.stages]
    assert starts[0] == 0 and stops[-1] == 32 and starts[1:] == stops[:-1]
    assert len({s.box for s in result.stages}) == len(result.stages)
    assert result.bottleneck_ms == pytest.approx(max(s.predicted_ms for s in result.stages))
    assert np.isfinite(result.bottleneck_ms)
