"""The partitioner on the reference scenarios: feasible, explained, never worse
than the naive splits, deterministic; box profiles and the cost model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from edgemesh.errors import InfeasiblePlanError, PlanError
from edgemesh.sharding.planner.boxes import BoxProfile, parse_boxes
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import Plan, plan
from edgemesh.sharding.planner.scenarios import (
    MODELS,
    SCENARIOS,
    gemma_270m_like,
    llm_7b_like,
    report_markdown,
    scenario_report,
    synthetic_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
BOX_FILES = ROOT / "tests" / "data" / "boxes"


def scenario_plan(name: str, **options) -> Plan:
    s = SCENARIOS[name]
    boxes, links = parse_boxes(s.boxes_json())
    return plan(MODELS[s.model](), boxes, links, PlanOptions(**options))


def assert_valid(result: Plan) -> None:
    """Contiguous, complete, one stage per box, every stage within its memory."""
    assert result.stages[0].layers.start == 0
    assert result.stages[-1].layers.stop == result.num_layers
    for a, b in zip(result.stages, result.stages[1:], strict=False):
        assert a.layers.stop == b.layers.start
        assert a.next_box == b.box
    assert result.stages[-1].next_box is None
    assert len({s.box for s in result.stages}) == len(result.stages)
    for s in result.stages:
        assert s.memory_bytes <= s.usable_bytes
        assert s.memory_bytes == s.weight_bytes + s.kv_bytes + s.overhead_bytes
    assert result.bottleneck_ms == max(s.predicted_ms for s in result.stages)


# -- scenarios ---------------------------------------------------------------


def test_a_pi5_orin_nuc_uses_all_three_and_gives_the_fast_box_most_layers() -> None:
    result = scenario_plan("pi5_orin_nuc")
    assert_valid(result)
    layers = {s.box: len(s.layers) for s in result.stages}
    assert set(layers) == {"pi5", "orin", "nuc"}
    assert layers["orin"] > layers["nuc"] > layers["pi5"]
    assert {s.backend for s in result.stages} == {"onnxruntime", "tensorrt", "openvino"}
    assert result.predicted_tokens_per_s == pytest.approx(1000 / result.bottleneck_ms)
    for name in ("memory_proportional", "equal"):
        assert result.baseline(name).bottleneck_ms > 2 * result.bottleneck_ms


def test_b_equal_memory_4x_speed_splits_by_speed_not_memory() -> None:
    result = scenario_plan("equal_memory_4x_speed")
    assert_valid(result)
    layers = {s.box: len(s.layers) for s in result.stages}
    assert layers["fast"] >= 3 * layers["slow"]
    mem = result.baseline("memory_proportional")
    assert [stop - start for _, start, stop, _, _ in mem.stages] == [16, 16]
    assert mem.bottleneck_ms == result.baseline("equal").bottleneck_ms  # same memory
    assert mem.bottleneck_ms / result.bottleneck_ms > 2


def test_c_a_box_too_small_for_any_layer_is_left_out_with_the_numbers() -> None:
    result = scenario_plan("one_box_too_small")
    assert_valid(result)
    assert "tiny" not in {s.box for s in result.stages}
    (left,) = result.left_out
    assert left.box == "tiny"
    assert left.reason.startswith("too small for any layer")
    assert "407 MB" in left.reason and "378 MB" in left.reason and "420 MB" in left.reason
    for b in result.baselines:  # the naive splits give it layers anyway
        assert not b.feasible and "tiny" in b.reason


def test_d_a_model_that_fits_nowhere_says_by_how_much_and_where() -> None:
    with pytest.raises(InfeasiblePlanError) as err:
        scenario_plan("fits_nowhere")
    msg = str(err.value)
    assert "8.52 GB" in msg and "short by 4.63 GB" in msg
    assert "pi5 3.51 GB (13 layers)" in msg and "tiny 378 MB (0 layers)" in msg
    assert err.value.hint and "--context" in err.value.hint


def test_e_eight_boxes() -> None:
    result = scenario_plan("eight_boxes")
    assert_valid(result)
    assert result.solver == "exact"
    assert len(result.stages) + len(result.left_out) == 8
    assert result.bottleneck_ms < result.baseline("memory_proportional").bottleneck_ms / 2
    # with 4 sequences in flight an 8-stage pipeline is not full: say so
    assert result.tokens_per_s_at_sequences <= result.predicted_tokens_per_s


def test_a_box_that_is_not_needed_is_left_out_with_why() -> None:
    result = scenario_plan("pi5_orin_nuc", objective="latency")
    assert_valid(result)
    reasons = {x.box: x.reason for x in result.left_out}
    assert set(reasons) == {"pi5"}
    assert reasons["pi5"].startswith("not needed: no plan using it has a lower latency")


def test_the_plan_is_never_worse_than_the_baselines_and_the_report_says_by_how_much() -> None:
    rows = scenario_report()
    assert {r["scenario"] for r in rows} == set(SCENARIOS)
    for r in rows:
        if "error" in r:
            assert r["scenario"] == "fits_nowhere"
            continue
        for name in ("memory_proportional", "equal"):
            base = r[f"{name}_ms"]
            assert base is None or base >= r["bottleneck_ms"]
            assert r[f"speedup_{name}"] is None or r[f"speedup_{name}"] >= 1
    assert any((r.get("speedup_memory_proportional") or 0) > 2 for r in rows)


def test_docs_table_is_the_generated_report() -> None:
    docs = (ROOT / "docs" / "PLANNER.md").read_text()
    assert report_markdown(scenario_report()) in docs


def test_box_files_are_the_scenarios() -> None:
    for name, s in SCENARIOS.items():
        assert json.loads((BOX_FILES / f"{name}.json").read_text()) == s.boxes_json()


# -- objectives, precision, determinism --------------------------------------


def test_each_objective_wins_on_its_own_figure() -> None:
    thr = scenario_plan("pi5_orin_nuc")
    lat = scenario_plan("pi5_orin_nuc", objective="latency")
    assert thr.bottleneck_ms < lat.bottleneck_ms
    assert lat.latency_ms < thr.latency_ms


def test_max_accuracy_loss_excludes_precisions_above_it() -> None:
    # 7b-like: int4 costs 0.045, int8 0.006, fp16 unmeasured (allowed: fp16 is lossless in practice)
    best = scenario_plan("pi5_orin_nuc")
    no_int4 = scenario_plan("pi5_orin_nuc", max_accuracy_loss=0.01)
    assert "int4" in {s.precision for s in best.stages}
    assert "int4" not in {s.precision for s in no_int4.stages}
    assert no_int4.bottleneck_ms > best.bottleneck_ms
    wide = scenario_plan("pi5_orin_nuc", max_accuracy_loss=0.001)
    assert {s.precision for s in wide.stages} <= {"fp32", "fp16"}
    with pytest.raises(InfeasiblePlanError) as err:  # fp16 weights + a long context: too much
        scenario_plan("pi5_orin_nuc", max_accuracy_loss=0.001, context=32768)
    assert "of weights at fp16" in str(err.value) and "32768 tokens × 4 sequences" in str(err.value)


def test_unmeasured_int8_is_refused_but_unmeasured_fp16_is_allowed() -> None:
    manifest = gemma_270m_like()
    manifest = type(manifest)(**{**manifest.__dict__, "accuracy": {"fp16": None, "int8": None}})
    box = BoxProfile.from_dict(
        {
            "id": "b",
            "memory_limit_bytes": 8 * 10**9,
            "backends": ["rt"],
            "compute": {
                "rt/int8": {"gflops": 100, "bandwidth_gbps": 20},
                "rt/fp16": {"gflops": 50, "bandwidth_gbps": 10},
            },
        }
    )
    model = CostModel(manifest, [box], options=PlanOptions())
    assert [o.precision for o in model.costs[0].options] == ["fp16"]
    assert model.costs[0].refused == [
        "rt/int8: accuracy not measured (only fp32/fp16 may be unmeasured; "
        "--max-accuracy-loss inf allows it)"
    ]
    assert plan(manifest, [box]).stages[0].precision == "fp16"


def test_spare_time_buys_accuracy_without_losing_tokens_per_s() -> None:
    """A fast box capped by memory has time to spare next to a slow one: it
    takes int8 instead of int4, and the bottleneck does not move."""
    manifest = synthetic_manifest(
        "kv-heavy",
        num_layers=8,
        hidden=512,
        intermediate=1024,
        heads=8,
        kv_heads=8,
        head_dim=64,
        vocab=1000,
        accuracy={"fp32": 0.0, "int8": 0.01, "int4": 0.05},
    )
    rates = {"gflops": 500, "bandwidth_gbps": 50}
    boxes, _ = parse_boxes(
        [
            {  # holds 6 layers at either precision (the fp32 KV cache dominates)
                "id": "fast",
                "memory_limit_bytes": 667_000_000,
                "backends": ["rt"],
                "compute": {"rt/int4": rates, "rt/int8": rates},
            },
            {
                "id": "slow",
                "memory_limit_bytes": 8 * 10**9,
                "backends": ["rt"],
                "compute": {"rt/int4": {"gflops": 10, "bandwidth_gbps": 1}},
            },
        ]
    )
    careful = plan(manifest, boxes)
    plain = plan(manifest, boxes, options=PlanOptions(prefer_accuracy=False))
    assert careful.bottleneck_ms == plain.bottleneck_ms
    assert [(s.box, len(s.layers)) for s in careful.stages] == [("fast", 6), ("slow", 2)]
    assert [s.precision for s in plain.stages] == ["int4", "int4"]
    assert [s.precision for s in careful.stages] == ["int8", "int4"]
    assert careful.latency_ms > plain.latency_ms  # the price: a little single-stream latency


def test_same_inputs_give_the_same_plan_in_any_box_order() -> None:
    s = SCENARIOS["eight_boxes"]
    boxes, links = parse_boxes(s.boxes_json())
    first = plan(llm_7b_like(), boxes, links).to_dict()
    for seed in range(3):
        shuffled = random.Random(seed).sample(boxes, len(boxes))
        assert plan(llm_7b_like(), shuffled, list(reversed(links))).to_dict() == first


def test_plan_round_trips_through_json() -> None:
    result = scenario_plan("one_box_too_small")
    text = json.dumps(result.to_dict(), allow_nan=False)  # infeasible baselines are null
    again = Plan.from_dict(json.loads(text))
    assert again == result
    with pytest.raises(PlanError):
        Plan.from_dict({"model": "x"})


def test_whole_model_only_backend_gets_everything_or_nothing() -> None:
    box = {
        "id": "solo",
        "memory_limit_bytes": 2 * 10**9,
        "backends": ["llamacpp"],
        "compute": {"cpu/int4": {"gflops": 50, "bandwidth_gbps": 20}},
    }
    other = {
        "id": "other",
        "memory_limit_bytes": 2 * 10**9,
        "backends": ["onnxruntime"],
        "compute": {"onnxruntime/int4": {"gflops": 5, "bandwidth_gbps": 2}},
    }
    boxes, _ = parse_boxes([box, other])
    options = PlanOptions(whole_model_only=("llamacpp",))
    result = plan(gemma_270m_like(), boxes, options=options)
    assert [(s.box, s.backend, str(s.layers)) for s in result.stages] == [
        ("solo", "llamacpp", "[0, 18)")
    ]
    boxes[0] = BoxProfile.from_dict({**box, "memory_limit_bytes": 4 * 10**8})
    result = plan(gemma_270m_like(), boxes, options=options)
    assert [s.box for s in result.stages] == ["other"]
    assert "the whole model at llamacpp/int4" in result.left_out[0].reason


def test_no_boxes_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no boxes"):
        plan(llm_7b_like(), [])


def test_infinite_baselines_do_not_leak_into_json() -> None:
    d = scenario_plan("one_box_too_small").to_dict()
    assert d["baselines"]["equal"]["bottleneck_ms"] is None
    assert d["baselines"]["equal"]["plan_speedup"] is None
    assert not any(isinstance(v, float) and math.isinf(v) for v in d.values())


def test_plan_takes_plain_dicts_as_the_mesh_has_them() -> None:
    s = SCENARIOS["pi5_orin_nuc"]
    boxes, links = parse_boxes(s.boxes_json())
    m = llm_7b_like()
    assert plan(m, s.boxes, s.links) == plan(m, boxes, links)


def test_a_whole_model_box_that_is_not_needed_says_what_the_whole_model_costs_it() -> None:
    slow = {
        "id": "slow",
        "memory_limit_bytes": 4 * 10**9,
        "backends": ["llamacpp"],
        "compute": {"llamacpp/int4": {"gflops": 5, "bandwidth_gbps": 1}},
    }
    boxes, _ = parse_boxes([slow, SCENARIOS["small_model_pi5_nuc"].boxes[1]])
    result = plan(gemma_270m_like(), boxes, options=PlanOptions(whole_model_only=("llamacpp",)))
    assert [s.box for s in result.stages] == ["nuc"]
    (left,) = result.left_out
    assert left.reason.startswith("not needed: no plan using it has a lower bottleneck than")
    assert "the whole model takes it" in left.reason
