"""Box profiles, links, options and the cost model's formulas; the
infeasibility diagnosis and the reasons a box is left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemesh.errors import ConfigError, InfeasiblePlanError
from edgemesh.sharding.planner.boxes import BoxProfile, Link, load_boxes, parse_boxes, resolve_link
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import plan
from edgemesh.sharding.planner.scenarios import SCENARIOS, gemma_270m_like, llm_7b_like

BOX_FILES = Path(__file__).resolve().parent / "data" / "boxes"


def int4_box(box_id: str, memory: int, **extra) -> dict:
    rate = {"gflops": 50, "bandwidth_gbps": 10}
    return {
        "id": box_id,
        "memory_limit_bytes": memory,
        "backends": ["rt"],
        "compute": {"rt/int4": rate},
        **extra,
    }


def test_box_from_an_info_json_uses_its_profile() -> None:
    model = pytest.importorskip("edgemesh.fingerprint.model")
    fp = model.Fingerprint(
        id="nuc-7f3a",
        hostname="nuc",
        arch="x86_64",
        cpu=model.CpuInfo("i7", "GenuineIntel", 8, 2.5, ("avx2",)),
        memory=model.MemoryInfo(16 * 10**9, 12 * 10**9, 10 * 10**9),
        board=None,
        accelerators=[],
        backends=["openvino", "onnxruntime", "llamacpp"],
        installed=["onnxruntime", "llamacpp"],
        precision="int8",
        measurement=model.Measurement(
            key="k",
            matmul=[
                model.MatmulFigure("onnxruntime", "int8", 120.0, 18.0),
                model.MatmulFigure("cpu", "fp32", 60.0, 15.0),
            ],
            memory_bandwidth_gbps=20.0,
            shapes={},
            versions={},
        ),
    )
    box = BoxProfile.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert box.id == "nuc-7f3a" and box.memory_limit_bytes == 12 * 10**9
    assert box.default_precision == "int8"
    runnable = [(b, p, r.derived_from) for b, p, r in box.runnable()]
    # cpu is a reference, not a backend; llama.cpp borrows its figure as a floor
    assert runnable == [
        ("onnxruntime", "int8", None),
        ("llamacpp", "fp32", "cpu/fp32"),
        ("llamacpp", "fp16", "cpu/fp32"),
        ("llamacpp", "int8", "cpu/fp32"),
        ("llamacpp", "int4", "cpu/fp32"),
    ]
    assert box.compute["llamacpp/int4"].bandwidth_gbps == 15.0
    assert BoxProfile.from_dict(box.to_dict()) == box  # derived figures survive the trip


def test_hand_profile_errors_carry_the_box_and_the_value() -> None:
    good = {"id": "x", "memory_limit_bytes": 10**9, "backends": ["rt"], "compute": {}}
    cases = [
        ({**good, "id": ""}, "has no 'id'"),
        ({**good, "memory_limit_bytes": 0}, "box 'x': memory_limit_bytes must be > 0, got 0"),
        (
            {**good, "compute": {"rt/fp8": {"gflops": 1, "bandwidth_gbps": 1}}},
            "unknown precision 'fp8'",
        ),
        ({**good, "compute": {"rt/fp16": {"gflops": 0, "bandwidth_gbps": 1}}}, "gflops=0.0"),
        ({**good, "compute": {"fp16": {}}}, "is not '<backend>/<precision>'"),
        ({**good, "link_gbps": -1}, "link_gbps must be > 0, got -1"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
            BoxProfile.from_dict(data)
    with pytest.raises(ConfigError, match="appears twice"):
        parse_boxes([good, good])
    with pytest.raises(ConfigError, match="names box 'ghost'"):
        parse_boxes({"boxes": [good], "links": [{"a": "x", "b": "ghost", "gbps": 1}]})


def test_load_boxes_reads_every_file_form(tmp_path) -> None:
    boxes, links = load_boxes(BOX_FILES / "pi5_orin_nuc.json")
    assert [b.id for b in boxes] == ["pi5", "orin", "nuc"] and len(links) == 3
    bare = tmp_path / "list.json"
    bare.write_text(json.dumps(SCENARIOS["pi5_orin_nuc"].boxes))
    assert [b.id for b in load_boxes(bare)[0]] == ["pi5", "orin", "nuc"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_boxes(bad)
    with pytest.raises(ConfigError, match="no boxes file"):
        load_boxes(tmp_path / "missing.json")


def test_links_measured_beat_box_figures_which_beat_defaults() -> None:
    a = BoxProfile.from_dict(
        {
            "id": "a",
            "memory_limit_bytes": 1,
            "backends": [],
            "link_gbps": 2.5,
            "link_latency_ms": 0.1,
        }
    )
    b = BoxProfile.from_dict(
        {
            "id": "b",
            "memory_limit_bytes": 1,
            "backends": [],
            "link_gbps": 0.9,
            "link_latency_ms": 0.4,
        }
    )
    c = BoxProfile.from_dict({"id": "c", "memory_limit_bytes": 1, "backends": []})
    table = {frozenset(("a", "b")): Link("a", "b", 0.5, 2.0)}
    assert resolve_link(a, b, table) == (0.5, 2.0)
    assert resolve_link(a, b, {}) == (0.9, 0.4)
    assert resolve_link(a, c, {}) == (2.5, 0.1)
    assert resolve_link(c, c, {}) == (1.0, 0.5)


def test_stage_costs_follow_the_documented_formula() -> None:
    """Hand-compute one middle stage, the first one (embedding) and the last (head)."""
    m = llm_7b_like()
    box = BoxProfile.from_dict(
        {
            "id": "b",
            "memory_limit_bytes": 100 * 10**9,
            "backends": ["rt"],
            "compute": {"rt/fp16": {"gflops": 1000, "bandwidth_gbps": 50}},
        }
    )
    model = CostModel(m, [box], options=PlanOptions(context=1000, sequences=3, headroom=0.2))
    opt = model.costs[0].options[0]
    layer = m.layers[0]
    flops = layer.flops_per_token + layer.attn_flops_per_token_per_ctx * 500
    read = layer.weight_bytes["fp16"] + layer.kv_bytes_per_token * 0.5 * 500
    per_layer = max(flops / 1e12, read / 50e9) * 1e3
    assert read / 50e9 > flops / 1e12  # decode is memory-bound here
    assert opt.time[3, 7] == pytest.approx(4 * per_layer, rel=1e-12)
    embed = m.embedding.weight_bytes["fp16"] / m.vocab_size / 50e9 * 1e3
    assert opt.time[0, 2] == pytest.approx(2 * per_layer + embed, rel=1e-12)
    head = max(m.head.flops_per_token / 1e12, m.head.weight_bytes["fp16"] / 50e9) * 1e3
    assert opt.time[30, 32] == pytest.approx(2 * per_layer + head, rel=1e-12)
    kv = layer.kv_bytes_per_token * 0.5 * 1000 * 3  # fp16 cache for 1000 tokens × 3 sequences
    assert opt.memory[3, 7] == pytest.approx(4 * (layer.weight_bytes["fp16"] + kv) + 150e6)
    assert opt.usable_bytes == pytest.approx(80e9)
    assert model.link_ms.shape == (1, 1)
    # the link: 4096 values × 2 bytes at the default 1 Gbit/s, plus 0.5 ms
    two = CostModel(m, [box, BoxProfile.from_dict({**box.to_dict(), "id": "c"})])
    assert two.link_ms[0, 1] == pytest.approx(4096 * 2 * 8 / 1e9 * 1e3 + 0.5)


def test_options_are_validated() -> None:
    for bad, message in [
        ({"objective": "fastest"}, "unknown objective 'fastest'"),
        ({"sequences": 0}, "sequences must be >= 1, got 0"),
        ({"headroom": 1.0}, r"headroom must be in \[0, 1\), got 1.0"),
        ({"context": 0}, "context must be >= 1 token, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PlanOptions(**bad)
    assert PlanOptions().context_for(llm_7b_like()) == 4096
    assert PlanOptions.from_dict(PlanOptions(sequences=2).to_dict()) == PlanOptions(sequences=2)


def test_enough_memory_in_all_but_no_box_takes_the_head_says_where() -> None:
    """Eight 300 MB boxes hold 2 GB, the model needs 1 GB, but the 94 MB LM head
    plus one layer and the runtime overhead fit on none of them."""
    boxes, _ = parse_boxes([int4_box(f"b{i}", 300_000_000) for i in range(8)])
    with pytest.raises(InfeasiblePlanError) as err:
        plan(gemma_270m_like(), boxes)
    msg = str(err.value)
    assert "cannot be cut to fit" in msg and "usable in all" in msg
    assert "no box can hold the LM head (94 MB) with a layer" in msg
    assert "no box can hold the embedding (94 MB) with a layer" in msg
    assert "b0 270 MB (3 layers)" in msg


def test_a_box_whose_precisions_are_all_refused_is_left_out_with_why() -> None:
    boxes, _ = parse_boxes(
        [
            int4_box("quantised", 8 * 10**9),
            {
                **int4_box("wide", 8 * 10**9),
                "compute": {"rt/fp16": {"gflops": 5, "bandwidth_gbps": 1}},
            },
            {"id": "unmeasured", "memory_limit_bytes": 8 * 10**9, "backends": ["rt"]},
        ]
    )
    result = plan(gemma_270m_like(), boxes, options=PlanOptions(max_accuracy_loss=0.01))
    assert [s.box for s in result.stages] == ["wide"]
    reasons = {x.box: x.reason for x in result.left_out}
    assert reasons["quantised"] == (
        "no allowed backend/precision: rt/int4: accuracy loss 0.065 > max_accuracy_loss 0.010"
    )
    assert reasons["unmeasured"].startswith("no compute figures")
    with pytest.raises(InfeasiblePlanError, match="no box can run model 'gemma-3-270m-like'"):
        plan(gemma_270m_like(), boxes[:1], options=PlanOptions(max_accuracy_loss=0.01))
