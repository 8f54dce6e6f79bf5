"""Figure 5: a model larger than any one box's memory limit, served by several boxes.

Run as root: ``python -m edgemesh.bench.memory [--limit-mb 1792]``
(writes ``bench/results/memory.json``; needs iproute2, cgroups, the mesh,
onnx and convert extras).

Why not the default model: Gemma 3 270M is 38 % embedding and 38 % output
head; the head is one indivisible piece that onnxruntime holds whole (and
briefly twice while loading), so splitting its 18 layers over boxes barely
lowers the largest box's need (measured: whole model at fp32 peaks at 1.74 GB,
the last half alone at 1.55 GB). The figure therefore uses a model whose
weights are in its layers: a random-weight Qwen3 (32 layers of 63 MB, hidden
1024, ~2 GB at fp32, a 384-token BPE vocabulary trained on the bundled text),
built and converted once (``edgemesh convert``'s code path, fp32 only) and
cached under ``~/.cache/edgemesh/bench/``. Random weights do not matter: the
figure is about where the bytes live, and greedy output is still checked
token for token.

Steps, every box limited to ``limit_mb`` of memory by its cgroup:

a. the planner (``edgemesh plan``) refuses one box with that limit, with its
   numbers (``InfeasiblePlanError``); and a real attempt to load the whole
   model in one cgroup with that limit is made and its fate recorded (the
   kernel's OOM kill, or a typed error);
b. four namespace boxes with that limit run ``edgemesh join``; the model is
   planned (``edgemesh plan``) over the three workers (the head keeps the
   Ray head, Ray Serve, the gateway and the package mirror) and deployed;
   greedy chats through the gateway equal the single unlimited box's output
   (the gateway counts the head, which holds no stage, as a newly joined box
   and re-plans over all four within seconds; recorded as ``moved_from_plan``);
   tokens/s, each box's process memory (cgroup anon/rss) and OOM kills, and
   whether the router had to move stages (an OOM-killed stage is a lost
   stage: it re-plans) are recorded.

Earlier runs at this limit, kept as findings: with the two workers of a
3-box mesh each planned 1169 MB (the planner's count has no line for the
box's own agent and Ray node, ~0.4-0.5 GB), both stage actors were
OOM-killed while loading, the router re-planned over all three boxes and
then served exactly; with all three boxes planned ~850 MB each, the head
(Ray head + Serve + the deploying driver + a stage) was OOM-killed and the
gateway never started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.errors import MeshError
from edgemesh.lab.meshlab import (
    BoxLimits,
    MeshLab,
    cgroup_oom_kills,
    load_1m,
    metrics,
    run_chats,
    stream_chat,
    wait_until,
)
from edgemesh.reexec import edgemesh_argv, python_argv

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "wide"
PORT = 8000
FORM_TIMEOUT_S = 240.0
TOKENS = 16
SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
COMPUTE = {"onnxruntime/fp32": {"gflops": 1.0, "bandwidth_gbps": 1.0}}
MB = 1 << 20


def cache_dir() -> Path:
    tag = "-".join(str(v) for v in SHAPE.values())
    return paths.bench_dir() / f"wide-qwen3-{tag}"


def build_package() -> Path:
    """The random wide Qwen3 as an fp32 package (built once, then reused)."""
    from edgemesh.errors import EdgemeshError
    from edgemesh.sharding.package.folder import open_package

    root = cache_dir()
    pkg = root / "pkg"
    if (pkg / "manifest.json").is_file():
        try:
            open_package(pkg)
            return pkg
        except EdgemeshError:
            pass
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    _build_hf(root / "hf")
    from edgemesh.sharding.convert.run import ConvertOptions, convert

    opts = ConvertOptions(precisions=("fp32",), name="wide-qwen3", evaluate=False, threads=2)
    convert(root / "hf", pkg, opts)
    shutil.rmtree(root / "hf", ignore_errors=True)  # 2 GB of safetensors no longer needed
    return pkg


def _build_hf(out: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from edgemesh.sharding.convert.run import eval_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(eval_text().splitlines(), trainer=trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", ids["<bos>"])]
    )
    config = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
        # A wide spread keeps greedy logits away from near-ties (see tests/fixtures).
        initializer_range=0.1,
        architectures=["Qwen3ForCausalLM"],
        **SHAPE,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out)


def weights_bytes(package: Path) -> dict[str, int]:
    from edgemesh.sharding.package.manifest import Manifest

    m = Manifest.load(package)
    layers = sum(int(c.weight_bytes["fp32"]) for c in m.layers)
    edges = int(m.embedding.weight_bytes["fp32"]) + int(m.head.weight_bytes["fp32"])
    return {"layers": layers, "embedding_and_head": edges, "total": layers + edges}


# -- (a) one box ----------------------------------------------------------------


def planner_single(package: Path, limit: int, tmp: Path) -> dict[str, Any]:
    """``edgemesh plan`` for one box with ``limit`` bytes: it must refuse, with numbers."""
    profiles = tmp / "one-box.json"
    profiles.write_text(
        json.dumps(
            [{"id": "one", "memory_limit_bytes": limit, "backends": ["onnxruntime"],
              "compute": COMPUTE}]
        )
    )  # fmt: skip
    out = subprocess.run(
        [*edgemesh_argv("plan"), "--model", str(package), "--boxes",
         str(profiles), "--context", "256", "--sequences", "4"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    from edgemesh.errors import InfeasiblePlanError
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.boxes import load_boxes
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.plan import plan

    boxes, links = load_boxes(profiles)
    try:
        plan(Manifest.load(package), boxes, links, PlanOptions(context=256, sequences=4))
        error = None
    except InfeasiblePlanError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        "cli_exit_code": out.returncode,
        "cli_message": (out.stderr or out.stdout).strip()[-1200:],
        "api_error": error,
    }


_LOAD_WHOLE = """
import sys, time
from edgemesh.offline import generate
from edgemesh.sharding.pipeline import load_pipeline
t = time.time()
pipe = load_pipeline(sys.argv[1], precision="fp32")
print("loaded", round(time.time() - t, 1), flush=True)
print("tokens", generate(pipe, [1, 5, 6, 7], max_tokens=2).token_ids, flush=True)
"""


def load_whole_in_one_box(package: Path, limit: int) -> dict[str, Any]:
    """Really try: the whole model in one process in a cgroup limited to ``limit``."""
    from edgemesh.lab.cgroups import Limits

    with Limits(None, limit, name="membench") as cg:
        t = time.monotonic()
        proc = subprocess.run(
            cg.wrap(python_argv(_LOAD_WHOLE, str(package))),
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - t
        oom = cgroup_oom_kills(cg)
    rc = proc.returncode
    if rc in (-9, 137) or (oom or 0) > 0:
        outcome = "killed by the kernel's OOM killer (SIGKILL)"
    elif rc == 0:
        outcome = "loaded and generated (the limit was large enough)"
    else:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        outcome = f"failed: {last[:300]}"
    return {
        "exit_code": rc,
        "oom_kills": oom,
        "seconds": round(seconds, 1),
        "outcome": outcome,
        "stdout": proc.stdout.strip()[-300:],
    }


# -- (b) the mesh -----------------------------------------------------------------


def reference(package: Path, texts: list[str]) -> tuple[list[str], float]:
    """The single unlimited box: greedy answers in process, and its tokens/s."""
    from edgemesh.offline import generate
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    pkg = open_package(package)
    tok = pkg.tokenizer()
    pipe = load_pipeline(pkg, precision="fp32")
    try:
        out, rates = [], []
        for text in texts:
            ids = tok.encode_chat([{"role": "user", "content": text}])
            gen = generate(pipe, ids, max_tokens=TOKENS)
            out.append(tok.decode(gen.token_ids))
            rates.append(gen.decode_tokens_per_s)
        return out, max(rates)
    finally:
        pipe.close()


def mesh_run(package: Path, limit: int, texts: list[str], wants: list[str]) -> dict[str, Any]:
    lab = MeshLab(
        [BoxLimits(memory_bytes=limit)] * 4, subnet="10.79.1", prefix="emm", mesh="benchmem"
    )
    row: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        for b in lab.boxes:
            b.join()
        head_id = wait_until(lambda: lab.formed(), FORM_TIMEOUT_S, lab.logs)
        row["formed_s"] = round(time.monotonic() - t0, 1)
        head = lab.box(head_id)
        workers = [b for b in lab.boxes if b is not head]
        # Every box has a profile in the record (a box without one looks newly
        # joined to the gateway, which would measure it and maybe move stages).
        everyone = lab.write_profiles("profiles", lab.boxes, COMPUTE, limit)
        only_workers = lab.write_profiles("workers", workers, COMPUTE, limit)
        code, plan, err = lab.plan(head, package, only_workers, "--context", "256")
        if plan is None:
            raise MeshError(f"edgemesh plan over the workers failed ({code}): {err[-2000:]}")
        row["plan"] = [
            {
                "box": s["box"],
                "layers": s["layers"],
                "memory_mb": round(s["memory_bytes"] / MB),
                "limit_mb": round(s["memory_limit_bytes"] / MB),
            }
            for s in plan["stages"]
        ]
        t = time.monotonic()
        record = lab.deploy(head, package, NAME, everyone, plan, PORT)
        row["deploy_s"] = round(time.monotonic() - t, 1)
        url = record["gateway"]
        first = stream_chat(url, NAME, texts[0], TOKENS)
        t = time.monotonic()
        one = stream_chat(url, NAME, texts[1], TOKENS)
        row["single_stream_tok_s"] = round(1000 / one.ms_per_token, 2)
        got = run_chats(url, NAME, texts, TOKENS)
        wall = time.monotonic() - t
        row["all_streams_s"] = round(wall, 1)
        row["aggregate_tok_s_4"] = round(sum(g.completion_tokens for g in got) / (wall), 2)
        row["exact"] = [first.text, one.text] == wants[:2] and [g.text for g in got] == wants
        info = metrics(url, NAME)["info"]
        row["stages"] = [
            {k: s.get(k) for k in ("box", "layers", "precision")} for s in info["stages"]
        ]
        row["recoveries"] = info.get("recoveries")
        row["moved_from_plan"] = [(s["box"], s["layers"]) for s in row["stages"]] != [
            (s["box"], s["layers"]) for s in row["plan"]
        ]
        row["boxes"] = [
            {
                "box": b.id,
                "role": "head" if b is head else "worker",
                "limit_mb": round(limit / MB),
                "process_mb": round((b.anon_bytes() or 0) / MB),
                "peak_cgroup_mb_incl_page_cache": round((b.memory_peak_bytes() or 0) / MB),
                "oom_kills": b.oom_kills(),
            }
            for b in lab.boxes
        ]
    except BaseException:
        row["boxes_at_failure"] = [
            {"box": b.id, "peak_mb": round((b.memory_peak_bytes() or 0) / MB),
             "oom_kills": b.oom_kills()}
            for b in lab.boxes
        ]  # fmt: skip
        row["logs"] = lab.logs()[-3000:]
        (RESULTS / "memory.failed.json").write_text(json.dumps(row, indent=2))
        raise
    finally:
        lab.close()
    return row


def run(*, limit_mb: int = 1792, out: Path | None = None) -> dict[str, Any]:
    import tempfile

    from edgemesh.lab.cgroups import unavailable
    from edgemesh.lab.netns import skip_reason

    why = skip_reason() or unavailable()
    if why:
        raise MeshError(f"cannot build limited namespace boxes: {why}")
    limit = limit_mb * MB
    package = build_package()
    weights = weights_bytes(package)
    texts = [f"The {w} of the mesh" for w in ("story", "shape", "price", "color")]
    load_start = load_1m()
    wants, single_tok_s = reference(package, texts)
    tmp = Path(tempfile.mkdtemp(prefix="edgemesh-membench-"))
    try:
        planner = planner_single(package, limit, tmp)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    whole = load_whole_in_one_box(package, limit)
    mesh = mesh_run(package, limit, texts, wants)
    result = {
        "command": f"sudo python -m edgemesh.bench.memory --limit-mb {limit_mb}",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "boxes": "network-namespace boxes, each in a cgroup (v1 or v2) memory limit, no swap",
        },
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": "wide-qwen3 (random weights): "
        + ", ".join(f"{k.replace('num_', '')} {v}" for k, v in SHAPE.items()),
        "precision": "fp32",
        "weights_mb": {k: round(v / MB) for k, v in weights.items()},
        "limit_mb": limit_mb,
        "tokens": TOKENS,
        "load_1m_start": load_start,
        "planner_one_box": planner,
        "whole_model_in_one_box": whole,
        "mesh": mesh,
        "runs": [
            {
                "setup": "1 box, no limit (in process, reference)",
                "limit_mb": None,
                "outcome": "serves",
                "tokens_per_s": round(single_tok_s, 2),
            },
            {
                "setup": "planner, 1 box",
                "limit_mb": limit_mb,
                "outcome": "refused: " + (planner["api_error"] or "NOT refused")[:160],
                "tokens_per_s": None,
            },
            {
                "setup": "whole model loaded in 1 box",
                "limit_mb": limit_mb,
                "outcome": whole["outcome"],
                "tokens_per_s": None,
            },
            {
                "setup": f"mesh: 4 boxes, {len(mesh['stages'])} stages"
                + (
                    " (planned on the 3 workers; the gateway then re-planned onto every box)"
                    if mesh.get("moved_from_plan")
                    else " on the workers"
                ),
                "limit_mb": limit_mb,
                "outcome": "serves, output equal to the single box"
                if mesh["exact"]
                else "serves, but output DIFFERS from the single box",
                "tokens_per_s": mesh["single_stream_tok_s"],
            },
        ],
        "load_1m_end": load_1m(),
    }
    target = out or RESULTS / "memory.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-mb", type=int, default=1792, help="memory limit of every box (MiB)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/memory.json")
    ap.add_argument(
        "--build-only", action="store_true", help="only build (or find) the model package"
    )
    ap.add_argument(
        "--package",
        type=Path,
        default=None,
        help="accepted so `edgemesh bench all` can pass the default package to every "
        "benchmark; not used: this figure needs a model whose weights are in its layers "
        "(see the module docstring), built here",
    )
    args = ap.parse_args(argv)
    if args.build_only:
        pkg = build_package()
        print(json.dumps({"package": str(pkg), "weights_mb": {
            k: round(v / MB) for k, v in weights_bytes(pkg).items()}}))  # fmt: skip
        return {}
    result = run(limit_mb=args.limit_mb, out=args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
