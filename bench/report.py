"""Render docs/BENCHMARKS.md (tables + PNG plots) from bench/results/*.json.

Every figure is a ratio against a reference measured in the same run, and
under each one the page prints the exact command and the machine that
produced it. A figure whose result file is missing says so and names the
command that would produce it, instead of showing stale or invented numbers.

    python -m edgemesh.bench.report      # re-render from the stored results
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgemesh.bench.tables import missing, provenance, table

log = logging.getLogger(__name__)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
REPO = BENCH.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
IMG = REPO / "docs" / "img"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, name: str) -> str:
    IMG.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(IMG / name, dpi=110)
    _plt().close(fig)
    return f"\n![{name}](img/{name})\n"


# -- figure 1: single box --------------------------------------------------


def figure_single() -> str:
    out = "## 1. Single box: edgemesh backends vs llama-cpp-python\n"
    # single.json holds every engine of backends.json plus the HTTP path.
    result = _load("single") or _load("backends")
    if result is None:
        return out + missing("edgemesh bench single")
    ref = result["runs"]["llama-cpp-python"]["decode_tokens_per_s"]
    rows = []
    for name, run in result["runs"].items():
        tps = run.get("decode_tokens_per_s")
        rows.append(
            [name, run.get("precision"), tps, run.get("ttft_ms"), run.get("peak_rss_mb"),
             tps / ref if ref and tps else None]
        )  # fmt: skip
    out += table(
        ["engine", "precision", "decode tok/s", "TTFT ms", "peak RSS MB", "× llama.cpp"], rows
    )
    out += (
        f"\n{result.get('model')}, {result.get('prompt_tokens')}-token prompt, "
        f"{result.get('tokens')} greedy tokens, {result.get('threads')} threads, median of "
        f"{result.get('repeats')}; 1-minute load average {result.get('loadavg_1m', '?')}. "
        "`llamacpp` is edgemesh's backend on the same GGUF; `onnxruntime`/`openvino` run the "
        "converted package; `gateway-llamacpp` streams over HTTP from `edgemesh serve`.\n"
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    ax.barh([str(r[0]) for r in rows], [r[2] or 0 for r in rows], color="#3b6fd8")
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.invert_yaxis()
    out += _save(fig, "single_box.png")
    return out + provenance(result)


# -- figures 2 and 3: pipeline --------------------------------------------


def figure_pipeline() -> str:
    out = "## 2. Pipeline: cost of each hop, latency through 1, 2 and 3 stages\n"
    mesh = _load("mesh")
    result = _load("pipeline")
    if mesh is None and result is None:
        return out + missing("python -m edgemesh.bench.mesh")
    if mesh and mesh.get("mesh_stages"):
        out += _mesh_stages(mesh)
    else:
        out += missing("python -m edgemesh.bench.mesh")
    if result is not None:
        out += _loopback_pipeline(result)
    return out


def _stage_rows(ms: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    return sorted((int(k.split("_")[0]), v) for k, v in ms.items() if k.endswith("_stages"))


def _mesh_stages(mesh: dict[str, Any]) -> str:
    ms = mesh["mesh_stages"]
    single = mesh.get("single_box", {})
    ref = single.get("ms_per_token")
    stages = _stage_rows(ms)
    out = (
        f"\nOn a real mesh: three namespace boxes each running `edgemesh join`, "
        f"{mesh.get('model')} at {mesh.get('precision')} on {mesh.get('backend')}, "
        f"{mesh.get('tokens')} greedy tokens, through the mesh gateway (HTTP, streamed). "
        f"Reference: the single box in process ({ref} ms/token). {ms.get('note', '')}.\n"
    )
    rows = [["single box, in process", "all", ref, 1.0, None, True]]
    gw = ms.get("1_stages_in_gateway")
    if gw:
        lat = gw.get("ms_per_token")
        rows.append(
            ["1 stage, in the gateway's process (head)", "all", lat,
             lat / ref if ref and lat else None, None, gw.get("exact")]
        )  # fmt: skip
    for n, s in stages:
        layers = " ".join(f"[{a},{b})" for a, b in s.get("layers", []))
        lat = s.get("ms_per_token")
        rows.append(
            [f"{n} stage(s), mesh", layers, lat, lat / ref if ref and lat else None,
             s.get("per_hop_ms"), s.get("exact")]
        )  # fmt: skip
    out += table(
        ["path", "layers", "ms/token", "× single box", "per-hop ms", "exact vs single box"], rows
    )
    hop = ms.get("hop_bytes_per_token", {})
    if hop:
        out += (
            f"\nBytes per token per hop: {hop.get('hidden')} (hidden state, "
            f"{hop.get('wire_dtype')}), {hop.get('pickled_batch')} as shipped "
            f"({hop.get('source')}).\n"
        )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["single box"] + [f"{n} stage(s)" for n, _ in stages]
    values = [ref or 0] + [s.get("ms_per_token") or 0 for _, s in stages]
    ax.bar(labels, values, color=["#888888"] + ["#3b6fd8"] * len(stages))
    ax.set_ylabel("ms per token (lower is better)")
    out += _save(fig, "mesh_latency.png")
    out += provenance(mesh) + _load_line(mesh)
    return out


# -- figure 3: throughput ----------------------------------------------------


def figure_throughput() -> str:
    out = "## 3. Throughput: aggregate tokens/s vs concurrent streams\n"
    result = _load("throughput")
    if result is None:
        out += missing("edgemesh bench throughput")
    else:
        out += _one_box_throughput(result)
    # The mesh bench's run made for this figure (batched stages), else its last full run.
    mesh = _load("mesh_throughput") or _load("mesh")
    if mesh and mesh.get("mesh_stages"):
        stages = _stage_rows(mesh["mesh_stages"])
        out += (
            "\n### Through the mesh (`bench/mesh.py`, its own run)\n\nThree namespace boxes "
            "running `edgemesh join`, 16 sequences in the plan, streamed chats through the "
            "mesh gateway, every answer checked against the single box at fp32 "
            f"(exact: {', '.join(str(s.get('exact')) for _, s in stages)}).\n"
        )
        out += _throughput(
            stages, "mesh_throughput.png", ref_tok_s=mesh.get("single_box", {}).get("tok_s")
        )
        out += provenance(mesh) + _load_line(mesh)
    return out


def _one_box_throughput(result: dict[str, Any]) -> str:
    streams = result["streams"]
    engines = result["engines"]
    out = (
        f"\nOne box, {result.get('model')}: {result.get('prompt_tokens')}-token prompts, "
        f"{result.get('tokens')} greedy tokens per stream, all streams submitted at once, "
        f"{result.get('threads')} threads. Aggregate decode tokens/s = tokens delivered while "
        "every stream was decoding, over that window. Reference: llama.cpp's own batched "
        "decode (one `llama_decode` of one token per sequence per step, llama-cpp-python's "
        "low-level API) on the GGUF, same run.\n"
    )
    rows = []
    for name, r in engines.items():
        runs = r["runs"]
        rows.append([name, *[runs[str(n)]["aggregate_tok_s"] for n in streams]])
        rows.append(["  × 1 stream", *[runs[str(n)].get("vs_1_stream") for n in streams]])
        if not name.startswith("llama.cpp batched"):
            rows.append(
                ["  × llama.cpp batched", *[runs[str(n)].get("vs_llama_cpp_batched")
                                           for n in streams]]
            )  # fmt: skip
    goals = result.get("goals_vs_1_stream", {})
    rows.append(["goal × 1 stream", *[goals.get(str(n), goals.get(n)) for n in streams]])
    out += table(["engine", *[f"{n} streams" for n in streams]], rows)
    notes = []
    for name, r in engines.items():
        if "ttft_p50_16_vs_1" in r:
            one, many = r["runs"]["1"], r["runs"].get("16", {})
            notes.append(
                f"{name}: TTFT p50 {one['ttft_p50_ms']} ms alone, {many.get('ttft_p50_ms')} ms "
                f"at 16 streams ({r['ttft_p50_16_vs_1']}×; goal ≤ 2×)"
            )
        if "prefill" in r:
            f = r["prefill"]
            notes.append(
                f"{name}: one {result.get('prompt_tokens')}-token prompt prefills in "
                f"{f['one_prompt_ms']} ms, all {f['streams']} in one call in "
                f"{f['all_prompts_one_call_ms']} ms, so no schedule can bring TTFT p50 at "
                f"{f['streams']} streams below {f['ttft_p50_floor_vs_1']}× one stream on this box"
            )
        if "serving_rss_vs_planned" in r:
            notes.append(
                f"{name}: RSS while serving {max(streams)} streams peaked at "
                f"{r['serving_rss_peak_bytes'] / 1e6:.0f} MB vs the planner's "
                f"{r['planned']['total'] / 1e6:.0f} MB for the box "
                f"({r['serving_rss_vs_planned']}×; goal within 10 %); lifetime peak with "
                f"loading {r['peak_rss_bytes'] / 1e6:.0f} MB ({r['peak_rss_vs_planned']}×)"
            )
        elif "peak_rss_vs_planned" in r:
            notes.append(
                f"{name}: peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB vs the planner's "
                f"{r['planned']['total'] / 1e6:.0f} MB for the box "
                f"({r['peak_rss_vs_planned']}×; goal within 10 %)"
            )
        fc = r.get("full_context", {})
        if "vs_planned" in fc:
            notes.append(
                f"{name}: RSS with {fc['streams']} sequences run to {fc['tokens_each']} of "
                f"{result.get('context')} tokens (the context the planner budgets KV for) "
                f"{fc['serving_rss_peak_bytes'] / 1e6:.0f} MB ({fc['vs_planned']}× the planner's "
                "figure, which counts the KV once; a range graph takes the past KV and "
                "returns the present, so a step holds both)"
            )
        layout = r.get("layout")
        if layout:
            notes.append(
                f"KV layout, one decode step of {layout['sequences']} sequences: compact "
                f"{layout['compact_step_ms']} ms vs spread over all {layout['slots']} slots "
                f"{layout['all_slots_step_ms']} ms"
            )
    out += "".join(f"\n* {n}" for n in notes) + "\n"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in engines.items():
        ax.plot(streams, [r["runs"][str(n)]["aggregate_tok_s"] for n in streams], "o-",
                label=name)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(streams, [str(c) for c in streams])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.legend(fontsize=8)
    out += _save(fig, "throughput_one_box.png")
    return out + provenance(result) + _load_line(result)


def _load_line(result: dict[str, Any]) -> str:
    """The host's 1-minute load average around the run (the host is shared)."""
    a, b = result.get("load_1m_start"), result.get("load_1m_end")
    return f"\n_Load (1-min average, 2 cores shared with other work):_ {a} at start, {b} at end\n"


def _throughput(
    stages: list[tuple[int, dict[str, Any]]], png: str, ref_tok_s: float | None = None
) -> str:
    streams = sorted(
        {int(k.rsplit("_", 1)[1]) for _, s in stages for k in s if k.startswith("aggregate")}
    )
    out = ""
    if ref_tok_s:
        out += f"\nSingle box in process, one stream: {ref_tok_s} tokens/s.\n"
    out += table(
        ["stages", *[f"{c} streams tok/s" for c in streams], f"{streams[-1]} vs 1"],
        [
            [n, *[s.get(f"aggregate_tok_s_{c}") for c in streams], s.get("ratio_16_vs_1")]
            for n, s in stages
        ],
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n, s in stages:
        ax.plot(streams, [s.get(f"aggregate_tok_s_{c}") or 0 for c in streams], "o-",
                label=f"{n} stage(s)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(streams, [str(c) for c in streams])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.legend()
    return out + _save(fig, png)


def _loopback_pipeline(result: dict[str, Any]) -> str:
    out = (
        "\n### Data plane and router on one Ray node (loopback)\n\n"
        "Echo stages (no compute) for the data plane; the router on a tiny model, so the "
        "figures are the router's own cost.\n"
    )
    plane = result.get("data_plane", {})
    payload = plane.get("payload_bytes", {})
    rows = []
    for name in ("ray_actor_calls", "compiled_graph", "tcp_msgpack"):
        if name in plane:
            rows.append([name.replace("_", " "), plane[name].get("per_hop_ms")])
    out += table(["data plane", "ms per hop"], rows)
    if payload:
        out += "\nBytes per token on the wire: " + ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in payload.items()
        ) + ".\n"  # fmt: skip
    router = result.get("router", {})
    stages = _stage_rows(router)
    if stages:
        base = stages[0][1].get("single_stream_tok_s")
        rows = []
        for n, s in stages:
            tps = s.get("single_stream_tok_s")
            layers = " ".join(f"[{a},{b})" for a, b in s.get("layers", []))
            rows.append(
                [n, layers, tps, 1000 / tps if tps else None, tps / base if base and tps else None]
            )
        out += table(["stages", "layers", "single stream tok/s", "ms/token", "× 1 stage"], rows)
        out += "\nAggregate tokens/s vs concurrent streams, same run:\n"
        out += _throughput(stages, "throughput.png")
    return out + provenance(result)


# -- figure 4: planner -----------------------------------------------------


def figure_planner() -> str:
    from edgemesh.sharding.planner.scenarios import scenario_report

    out = "## 4. Planner: predicted vs measured, and against simple splits\n"
    check = _load("planner_check")
    if check is None:
        out += missing("python -m edgemesh.bench.planner_check --model PKG")
    else:
        rows = [
            [r["box"], f"[{r['layers'][0]},{r['layers'][1]})", f"{r['backend']}/{r['precision']}",
             r.get("priced_by", "roofline"), r["predicted_ms"], r["measured_ms"], r["ratio"],
             r.get("roofline_ms"), r.get("roofline_ratio")]
            for r in check["stages"]
        ]  # fmt: skip
        header = ["box (CPU quota)", "layers", "backend", "priced by", "predicted ms"]
        header += ["measured ms", "measured / predicted", "roofline ms", "measured / roofline"]
        out += table(header, rows)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 3))
        xs = range(len(rows))
        ax.bar([x - 0.27 for x in xs], [r[4] for r in rows], 0.27, label="predicted (calibrated)")
        ax.bar([x for x in xs], [r[5] for r in rows], 0.27, label="measured")
        ax.bar([x + 0.27 for x in xs], [r[7] or 0 for r in rows], 0.27, label="roofline alone")
        ax.set_xticks(list(xs), [r[0] for r in rows])
        ax.set_ylabel("ms per token")
        ax.legend(fontsize="small")
        out += _save(fig, "planner_check.png")
        out += (
            f"\nLargest deviation of measured from predicted: {check['max_relative_error']:.0%}. "
            "Each box times the real model with `edgemesh info --measure --calibrate` inside its "
            "cgroup, and the planner prices its stages from those timings (docs/PLANNER.md, "
            '"Calibration"). "Roofline alone" prices the same stages from the matmul '
            "micro-benchmarks only; it misses per-operator dispatch costs and how a runtime's "
            "threads behave under a CPU quota. Measured: one sequence's decode step, the "
            f"median of {check.get('windows', '?')} windows' means, "
            f"{check.get('seconds', '?')} s each.\n"
        )
        out += provenance(check)
    rows = []
    for r in scenario_report():
        if "error" in r:
            rows.append([r["scenario"], "fits nowhere", None, None, None])
            continue
        rows.append(
            [r["scenario"], r["bottleneck_ms"], r.get("memory_proportional_ms"), r.get("equal_ms"),
             r.get("speedup_memory_proportional")]
        )  # fmt: skip
    out += "\nScenario set (`sharding/planner/scenarios.py`), predicted bottleneck per token:\n"
    header = ["scenario", "edgemesh ms", "memory-proportional ms", "equal split ms"]
    out += table([*header, "× vs memory-proportional"], rows)
    out += "\n_Source:_ `edgemesh.sharding.planner.scenarios.scenario_report()` (cost model only)\n"
    return out


# -- figures 5 and 6: memory and mesh --------------------------------------


def figure_memory() -> str:
    out = "## 5. Memory: a model larger than any one box\n"
    result = _load("memory")
    if result is None:
        return out + missing("python -m edgemesh.bench.memory")
    w = result.get("weights_mb", {})
    out += (
        f"\nModel: {result.get('model')}, {result.get('precision')}, weights "
        f"{w.get('total')} MB ({w.get('layers')} MB in layers). Every box is a cgroup "
        f"limited to {result.get('limit_mb')} MB (no swap).\n"
    )
    rows = [
        [r["setup"], r.get("limit_mb"), r["outcome"], r.get("tokens_per_s")] for r in result["runs"]
    ]
    out += table(["setup", "memory limit per box (MB)", "outcome", "tokens/s"], rows)
    mesh = result.get("mesh", {})
    if mesh.get("plan"):
        out += (
            "\nPlan (`edgemesh plan` over the workers, profiles at the box limit; the head keeps "
            "Ray, Serve and the gateway):\n"
        )
        out += table(
            ["box", "layers", "planned MB", "limit MB"],
            [[s["box"], f"[{s['layers'][0]},{s['layers'][1]})", s["memory_mb"], s["limit_mb"]]
             for s in mesh["plan"]],
        )  # fmt: skip
    if mesh.get("stages"):
        out += "\nStages as served (gateway `/metrics`): " + ", ".join(
            f"{s['box']} [{s['layers'][0]},{s['layers'][1]})" for s in mesh["stages"]
        ) + ".\n"  # fmt: skip
    boxes = mesh.get("boxes", [])
    if boxes:
        out += (
            "\nMemory of each box's cgroup after serving: its processes (agent, Ray, stage, "
            "gateway; anon/rss) and the peak including page cache (fetched artifacts), "
            f"OOM kills; router recoveries: {mesh.get('recoveries')}, stages moved from the "
            f"plan: {mesh.get('moved_from_plan')}:\n"
        )
        out += table(
            ["box", "role", "process MB", "peak incl. cache MB", "limit MB", "OOM kills"],
            [[b["box"], b["role"], b.get("process_mb"),
              b.get("peak_cgroup_mb_incl_page_cache"), b["limit_mb"], b["oom_kills"]]
             for b in boxes],
        )  # fmt: skip
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = ["whole model\n(weights)"] + [f"{b['box']}\n{b['role']}" for b in boxes]
        values = [w.get("total") or 0] + [b.get("process_mb") or 0 for b in boxes]
        ax.bar(labels, values, color=["#c0504d"] + ["#3b6fd8"] * len(boxes))
        ax.axhline(result.get("limit_mb") or 0, color="k", ls="--", label="limit per box")
        ax.set_ylabel("MB (boxes: their processes)")
        ax.legend()
        out += _save(fig, "memory.png")
    planner = result.get("planner_one_box", {})
    if planner.get("api_error"):
        out += f"\nThe planner's refusal, verbatim:\n\n```\n{planner['api_error']}\n```\n"
    return out + provenance(result) + _load_line(result)


def figure_mesh() -> str:
    out = "## 6. Mesh: from `edgemesh join` to the first token, and recovery\n"
    result = _load("mesh")
    if result is None:
        return out + missing("python -m edgemesh.bench.mesh")
    seconds = result["seconds"]
    out += table(["event", "seconds"], [[k.replace("_", " "), v] for k, v in seconds.items()])
    rec = result.get("recovery")
    if rec:
        out += (
            f"\nRecovery: {rec['streams']} streamed chats of {rec['tokens']} tokens; a non-head "
            f"box's whole process tree was SIGKILLed after {rec['unplugged_after_chunks']} "
            f"chunks. Largest pause a client saw: {rec['pause_s_max']} s (median gap between "
            f"chunks {rec['median_gap_ms']} ms); answers complete: {rec['complete']}, equal to "
            f"the single box: {rec['exact']}; router recoveries: {rec['recoveries']}; stages "
            "after: "
            + ", ".join(f"{s['box']} [{s['layers'][0]},{s['layers'][1]})"
                        for s in rec.get("stages_after", []))
            + ".\n"
        )  # fmt: skip
    steps = [(k, v) for k, v in seconds.items() if k.startswith("join_to_")]
    if steps:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.barh([k.removeprefix("join_to_").replace("_", " ") for k, _ in steps],
                [v for _, v in steps], color="#3b6fd8")  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel("seconds since `edgemesh join` started on 3 boxes")
        out += _save(fig, "mesh_timeline.png")
    return out + provenance(result) + _load_line(result)


def figure_vision() -> str:
    from edgemesh.bench import vision  # graph models; its own module renders its section

    return vision.figure(_load("vision"))


def figure_gateway() -> str:
    from edgemesh.bench import gateway  # its own module renders its section

    return gateway.figure(_load("gateway"))


FIGURES: list[Callable[[], str]] = [
    figure_single,
    figure_pipeline,
    figure_throughput,
    figure_planner,
    figure_memory,
    figure_mesh,
    figure_vision,
    figure_gateway,
]

HEADER = """# Benchmarks

Generated by `edgemesh bench all` (or `python -m edgemesh.bench`) from the
JSON results in `bench/results/`; `python -m edgemesh.bench.report` re-renders
this page from stored results. Every number is measured; each figure is a
ratio against a reference measured in the same run, and names the command and
machine that produced it. Timings never gate tests.
"""


def render() -> Path:
    parts = [HEADER]
    for figure in FIGURES:
        try:
            parts.append(figure())
        except Exception as exc:  # a broken result file must not hide the other figures
            log.exception("figure %s failed", figure.__name__)
            parts.append(f"\n_{figure.__name__} could not be rendered: {exc}_\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))
    return DOC


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    print(render())
