"""Re-planning when boxes leave or join: few layers move, speed stays within tolerance."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from edgemesh.errors import InfeasiblePlanError, PlanError
from edgemesh.sharding.planner.boxes import parse_boxes
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import Plan, plan
from edgemesh.sharding.planner.replan import replan
from edgemesh.sharding.planner.scenarios import (
    MODELS,
    SCENARIOS,
    gemma_270m_like,
    llm_7b_like,
    orin,
)
from tests.test_planner_exact import all_plans, random_case


def boxes_of(name: str):
    return parse_boxes(SCENARIOS[name].boxes_json())


def moves(old: Plan, new: Plan) -> int:
    return sum(a != b for a, b in zip(old.assignment(), new.assignment(), strict=True))


def test_a_box_leaves_and_the_stages_it_did_not_touch_stay() -> None:
    boxes, links = boxes_of("pi5_orin_nuc")
    m = llm_7b_like()
    old = plan(m, boxes, links)
    assert [s.box for s in old.stages] == ["pi5", "orin", "nuc"]
    rest = [b for b in boxes if b.id != "pi5"]
    fresh = plan(m, rest, links)
    new = replan(old, m, rest, links)
    nuc_old = next(s for s in old.stages if s.box == "nuc")
    nuc_new = next(s for s in new.stages if s.box == "nuc")
    assert nuc_new.layers == nuc_old.layers and nuc_new.precision == nuc_old.precision
    assert new.moved_layers == moves(old, new) == len(old.stages[0].layers) == 2
    assert moves(old, fresh) > new.moved_layers
    assert fresh.bottleneck_ms <= new.bottleneck_ms <= fresh.bottleneck_ms * 1.05


def test_a_box_joins_and_takes_layers_only_where_it_pays() -> None:
    boxes, links = boxes_of("equal_memory_4x_speed")
    m = llm_7b_like()
    old = plan(m, boxes, links)
    joined = [*boxes, *parse_boxes([orin()])[0]]
    fresh = plan(m, joined, links)
    new = replan(old, m, joined, links)
    assert "orin" in {s.box for s in new.stages}  # a 2× faster plan is worth some moves
    assert new.bottleneck_ms <= fresh.bottleneck_ms * 1.05 < old.bottleneck_ms / 1.5
    assert new.moved_layers == moves(old, new) <= moves(old, fresh)
    # a box that would speed things up by less than the tolerance is not worth a move
    lazy = replan(old, m, joined, links, PlanOptions(replan_tolerance=10.0))
    assert lazy.moved_layers == 0 and [s.layers for s in lazy.stages] == [
        s.layers for s in old.stages
    ]


def test_same_membership_moves_nothing() -> None:
    for name in ("pi5_orin_nuc", "eight_boxes"):
        boxes, links = boxes_of(name)
        m = MODELS[SCENARIOS[name].model]()
        for objective in ("throughput", "latency"):
            old = plan(m, boxes, links, PlanOptions(objective=objective))
            new = replan(old, m, boxes, links)
            assert new.moved_layers == 0
            assert new.stages == old.stages


def test_replan_is_a_pure_function_of_the_serialised_plan() -> None:
    boxes, links = boxes_of("eight_boxes")
    m = llm_7b_like()
    old = plan(m, boxes, links)
    wire = Plan.from_dict(json.loads(json.dumps(old.to_dict())))
    rest = [b for b in boxes if b.id not in {"nuc-a", "pi5-b"}]
    a = replan(old, m, rest, links)
    b = replan(wire, m, list(reversed(rest)), links)
    assert a.to_dict() == b.to_dict()
    assert a.moved_layers is not None and a.moved_layers < moves(old, plan(m, rest, links))


def test_replan_refuses_a_plan_of_another_model() -> None:
    boxes, links = boxes_of("small_model_pi5_nuc")
    old = plan(gemma_270m_like(), boxes, links)
    with pytest.raises(PlanError, match="old plan is for 'gemma-3-270m-like' \\(18 layers\\)"):
        replan(old, llm_7b_like(), boxes, links)


def test_replan_that_cannot_fit_raises_with_the_numbers() -> None:
    boxes, links = boxes_of("pi5_orin_nuc")
    m = llm_7b_like()
    old = plan(m, boxes, links)
    with pytest.raises(InfeasiblePlanError, match="short by"):
        replan(old, m, [b for b in boxes if b.id == "pi5"], links)


def old_plans(objective: str):
    """(seed, manifest, boxes, links, options, old plan) of the feasible random cases."""
    for seed in range(60):
        manifest, boxes, links, options = random_case(seed)
        options = dataclasses.replace(options, objective=objective, replan_tolerance=0.2)
        try:
            old = plan(manifest, boxes, links, options)
        except InfeasiblePlanError:
            continue
        yield seed, manifest, boxes, links, options, old


def test_replan_moves_the_fewest_layers_within_tolerance_exhaustively() -> None:
    """Brute force: among all plans within (1 + tol) of the best bottleneck, the fewest moves."""
    checked = 0
    for seed, manifest, boxes, links, options, old in old_plans("throughput"):
        checked += check_fewest_moves(seed, manifest, boxes, links, options, old)
    assert checked >= 30


def check_fewest_moves(seed, manifest, boxes, links, options, old) -> int:
    rng = random.Random(seed)
    if len(boxes) > 1 and rng.random() < 0.7:
        leaver = rng.choice(boxes).id
        members = [b for b in boxes if b.id != leaver]
    else:  # a box from another random case joins
        joiner = random_case(seed + 1000)[1][0]
        members = [*boxes, dataclasses.replace(joiner, id="joiner")]
    model = CostModel(manifest, members, links, options)
    before = old.assignment()
    found = []
    for times, stages in all_plans(model):
        moved = 0
        for b, j, k, o in stages:
            opt = model.costs[b].options[o]
            here = (model.boxes[b].id, opt.backend, opt.precision)
            moved += sum(before[i] != here for i in range(j, k))
        found.append((max(times), moved))
    if not found:
        with pytest.raises(InfeasiblePlanError):
            replan(old, manifest, members, links, options)
        return 0
    best = min(t for t, _ in found)
    fewest = min(mv for t, mv in found if t <= best * 1.2)
    new = replan(old, manifest, members, links, options)
    assert new.moved_layers == fewest == moves(old, new), seed
    assert new.bottleneck_ms <= best * 1.2 * (1 + 1e-9), seed
    return 1


def test_latency_replan_stays_within_budget_and_moves_no_more_than_a_fresh_plan() -> None:
    checked = 0
    for seed, manifest, boxes, links, options, old in old_plans("latency"):
        members = boxes[1:] if len(boxes) > 1 else boxes
        try:
            fresh = plan(manifest, members, links, options)
        except InfeasiblePlanError:
            continue
        new = replan(old, manifest, members, links, options)
        assert new.latency_ms <= fresh.latency_ms * 1.2 * (1 + 1e-9), seed
        assert new.moved_layers == moves(old, new) <= moves(old, fresh), seed
        assert math.isfinite(new.bottleneck_ms)
        checked += 1
    assert checked >= 20


def test_latency_replan_trades_a_little_latency_for_fewer_moves() -> None:
    boxes, links = boxes_of("eight_boxes")
    m = llm_7b_like()
    options = PlanOptions(objective="latency")
    old = plan(m, boxes, links, options)
    assert "orin-a" in {s.box for s in old.stages}
    rest = [b for b in boxes if b.id != "orin-a"]
    fresh = plan(m, rest, links, options)
    new = replan(old, m, rest, links)
    assert new.moved_layers == moves(old, new) < moves(old, fresh)
    assert fresh.latency_ms < new.latency_ms <= fresh.latency_ms * 1.05
