"""Reference scenarios for the planner: synthetic models, example boxes, a report.

The box figures are *illustrative estimates* of each board's decode-shaped
matmul speed and memory bandwidth, written by hand as a user planning for
hardware they do not own would; they are not measurements. The models are
built from their architecture (parameter counts → bytes and FLOPs), not
converted. ``scenario_report()`` is what docs/PLANNER.md's table and the
bench harness print: the plan against the memory-proportional and equal
splits under the same cost model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import InfeasiblePlanError
from edgemesh.sharding.package.manifest import LayerCost, Manifest, TokenizerInfo

BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0625, "int4": 0.5625}
"""int8/int4 carry one fp16 scale per group of 32 weights."""


def synthetic_manifest(
    name: str,
    *,
    num_layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    context: int = 32768,
    accuracy: dict[str, float | None] | None = None,
) -> Manifest:
    """A manifest whose costs follow from a Llama/Gemma-style decoder's shapes."""

    def sizes(params: int) -> dict[str, int]:
        return {p: int(params * b) for p, b in BYTES_PER_PARAM.items()}

    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * intermediate  # gate, up, down
    layer = LayerCost(
        weight_bytes=sizes(attn + mlp),
        flops_per_token=2 * (attn + mlp),
        kv_bytes_per_token=2 * kv_heads * head_dim * 4,  # K and V, fp32
        attn_flops_per_token_per_ctx=4 * heads * head_dim,  # q·k and p·v
    )
    table = vocab * hidden
    return Manifest(
        name=name,
        architecture="synthetic-decoder",
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=vocab,
        context_length=context,
        layers=[layer] * num_layers,
        embedding=LayerCost(weight_bytes=sizes(table), flops_per_token=0),
        head=LayerCost(weight_bytes=sizes(table), flops_per_token=2 * table),
        tokenizer=TokenizerInfo(file=None, bos_token_id=2, eos_token_ids=[1], chat_template=None),
        artifacts=[],
        accuracy=dict(accuracy or {"fp32": 0.0}),
        extra={"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim},
    )


def gemma_270m_like() -> Manifest:
    """Gemma 3 270M's shapes: 18 layers, hidden 640, vocabulary 262,144."""
    return synthetic_manifest(
        "gemma-3-270m-like",
        num_layers=18,
        hidden=640,
        intermediate=2048,
        heads=4,
        kv_heads=1,
        head_dim=256,
        vocab=262144,
        accuracy={"fp32": 0.0, "fp16": 0.001, "int8": 0.012, "int4": 0.065},
    )


def llm_7b_like() -> Manifest:
    """A Mistral-7B-shaped model: 32 layers, hidden 4096, 8 KV heads (fp16 unmeasured)."""
    return synthetic_manifest(
        "7b-like",
        num_layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=32000,
        accuracy={"fp32": 0.0, "fp16": None, "int8": 0.006, "int4": 0.045},
    )


def _box(
    box_id: str,
    memory_gb: float,
    backends: list[str],
    compute: Mapping[str, tuple[float, float]],
    link: tuple[float, float],
) -> dict[str, Any]:
    return {
        "id": box_id,
        "memory_limit_bytes": int(memory_gb * 1e9),
        "backends": backends,
        "compute": {k: {"gflops": g, "bandwidth_gbps": bw} for k, (g, bw) in compute.items()},
        "link_gbps": link[0],
        "link_latency_ms": link[1],
    }


def pi5(box_id: str = "pi5", memory_gb: float = 7.9) -> dict[str, Any]:
    """Raspberry Pi 5 (Cortex-A76 ×4, LPDDR4X), onnxruntime on the CPU."""
    compute = {
        "onnxruntime/fp32": (30, 8),
        "onnxruntime/int8": (45, 8),
        "onnxruntime/int4": (35, 8),
    }
    return _box(box_id, memory_gb, ["onnxruntime"], compute, (0.94, 0.3))


def orin(box_id: str = "orin") -> dict[str, Any]:
    """Jetson Orin Nano 8 GB (memory shared with the GPU), TensorRT first."""
    compute = {
        "tensorrt/fp16": (2500, 55),
        "tensorrt/int8": (4500, 55),
        "tensorrt/int4": (3000, 55),
        "onnxruntime/fp32": (60, 30),
    }
    return _box(box_id, 7.6, ["tensorrt", "onnxruntime"], compute, (0.94, 0.3))


def nuc(box_id: str = "nuc") -> dict[str, Any]:
    """Intel NUC (Core i7, 16 GB DDR5), OpenVINO first."""
    compute = {
        "openvino/fp32": (250, 30),
        "openvino/fp16": (200, 30),
        "openvino/int8": (400, 30),
        "openvino/int4": (300, 30),
        "onnxruntime/fp32": (180, 28),
    }
    return _box(box_id, 15.5, ["openvino", "onnxruntime"], compute, (2.5, 0.2))


def rk3588(box_id: str = "rk3588") -> dict[str, Any]:
    """RK3588 board, 8 GB: the NPU through RKNN, the CPU through onnxruntime."""
    compute = {
        "rknn/fp16": (500, 12),
        "rknn/int8": (1000, 12),
        "onnxruntime/fp32": (35, 12),
        "onnxruntime/int4": (40, 12),
    }
    return _box(box_id, 7.8, ["rknn", "onnxruntime"], compute, (0.94, 0.3))


def tiny(box_id: str = "tiny") -> dict[str, Any]:
    """A 512 MB board (~420 MB after the OS): too small for a 7B layer."""
    return _box(box_id, 0.42, ["onnxruntime"], {"onnxruntime/int4": (10, 3)}, (0.1, 1.0))


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    model: str
    """A key of ``MODELS``."""
    boxes: list[dict[str, Any]]
    links: list[dict[str, Any]] = field(default_factory=list)

    def boxes_json(self) -> dict[str, Any]:
        """The content of ``tests/data/boxes/<name>.json`` (an ``--boxes`` file)."""
        return {"boxes": self.boxes, "links": self.links}


MODELS = {"gemma-3-270m-like": gemma_270m_like, "7b-like": llm_7b_like}

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "pi5_orin_nuc",
            "(a) a Pi 5, a Jetson Orin Nano and a NUC, 7B",
            "7b-like",
            [pi5(), orin(), nuc()],
            [
                {"a": "pi5", "b": "nuc", "gbps": 0.9, "latency_ms": 0.4},
                {"a": "orin", "b": "nuc", "gbps": 0.94, "latency_ms": 0.3},
                {"a": "pi5", "b": "orin", "gbps": 0.9, "latency_ms": 0.5},
            ],
        ),
        Scenario(
            "equal_memory_4x_speed",
            "(b) two 8 GB boxes, one 4× faster, 7B",
            "7b-like",
            [
                _box("slow", 8.0, ["onnxruntime"], {"onnxruntime/int4": (40, 10)}, (1.0, 0.3)),
                _box("fast", 8.0, ["onnxruntime"], {"onnxruntime/int4": (160, 40)}, (1.0, 0.3)),
            ],
        ),
        Scenario(
            "one_box_too_small",
            "(c) an Orin, a NUC and a 512 MB board, 7B",
            "7b-like",
            [orin(), nuc(), tiny()],
        ),
        Scenario(
            "fits_nowhere",
            "(d) a 4 GB Pi 5 and a 512 MB board, 7B",
            "7b-like",
            [pi5(memory_gb=3.9), tiny()],
        ),
        Scenario(
            "eight_boxes",
            "(e) 2 Pi 5, 2 RK3588, 2 Orin Nano, 2 NUC, 7B",
            "7b-like",
            [
                pi5("pi5-a"),
                pi5("pi5-b"),
                rk3588("rk3588-a"),
                rk3588("rk3588-b"),
                orin("orin-a"),
                orin("orin-b"),
                nuc("nuc-a"),
                nuc("nuc-b"),
            ],
        ),
        Scenario(
            "small_model_pi5_nuc",
            "(f) Gemma-3-270M-like on a Pi 5 and a NUC",
            "gemma-3-270m-like",
            [pi5(), nuc()],
        ),
    ]
}


def write_box_files(folder: Path) -> list[Path]:
    """Write every scenario's ``--boxes`` file into ``folder`` (tests/data/boxes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in SCENARIOS.values():
        path = folder / f"{s.name}.json"
        path.write_text(json.dumps(s.boxes_json(), indent=2) + "\n")
        paths.append(path)
    return paths


def scenario_report(options: Any = None) -> list[dict[str, Any]]:
    """Plan every scenario; one row each with the plan's and the baselines' bottlenecks.

    ``speedup_*`` is baseline bottleneck / plan bottleneck (None when the
    baseline does not fit); ``error`` is set when the model fits nowhere.
    """
    from edgemesh.sharding.planner.boxes import parse_boxes
    from edgemesh.sharding.planner.plan import plan

    rows = []
    for s in SCENARIOS.values():
        boxes, links = parse_boxes(s.boxes_json())
        row: dict[str, Any] = {"scenario": s.name, "description": s.description, "model": s.model}
        try:
            p = plan(MODELS[s.model](), boxes, links, options)
        except InfeasiblePlanError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        row.update(
            stages=[f"{x.box} {x.layers} {x.precision}" for x in p.stages],
            left_out=[x.box for x in p.left_out],
            bottleneck_ms=p.bottleneck_ms,
            tokens_per_s=p.predicted_tokens_per_s,
        )
        for b in p.baselines:
            row[f"{b.name}_ms"] = b.bottleneck_ms if b.feasible else None
            row[f"speedup_{b.name}"] = b.bottleneck_ms / p.bottleneck_ms if b.feasible else None
        rows.append(row)
    return rows


def report_markdown(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (docs/PLANNER.md)."""

    def ms(v: float | None) -> str:
        return "does not fit" if v is None else f"{v:.1f}"

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}×"

    out = [
        "| scenario | plan (box [layers) precision) | plan ms/token | tokens/s | "
        "memory-prop. ms | equal ms | vs memory-prop. | vs equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['description']} | infeasible (exit 1) | — | — | — | — | — | — |")
            continue
        stages = "; ".join(r["stages"])
        if r["left_out"]:
            stages += f"; left out: {', '.join(r['left_out'])}"
        out.append(
            f"| {r['description']} | {stages} | {r['bottleneck_ms']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {ms(r['memory_proportional_ms'])} | {ms(r['equal_ms'])} | "
            f"{x(r['speedup_memory_proportional'])} | {x(r['speedup_equal'])} |"
        )
    return "\n".join(out)
