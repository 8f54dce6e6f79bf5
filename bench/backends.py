"""Backends on one box: decode tokens/s and TTFT of each CPU backend vs llama-cpp-python.

    python -m edgemesh.bench.backends PACKAGE [--gguf FILE] [--tokens 64] [--repeats 2]

``PACKAGE`` is the default model converted by ``edgemesh convert`` (the
GGUF defaults to the default model's, the file the package was converted
from). Each engine runs in its own subprocess with the same thread count
and the same prompt token ids, and decodes greedily:

* ``onnxruntime:<p>`` / ``openvino:<p>``: the whole model as one shard at
  each quantised precision ``p`` of the package, driven by edgemesh's
  ``sharding.pipeline.generate`` loop;
* ``llamacpp``: edgemesh's llama.cpp backend through the same loop;
* ``llama-cpp-python``: the reference, ``llama_cpp.Llama`` itself
  (``eval`` of the prompt, then ``sample``/``eval`` per token, greedy).

TTFT is prompt -> first token; decode tokens/s counts the tokens after the
first over the time after the first. The median of ``repeats`` runs is
kept. Ratios are against the reference's decode tokens/s; "same bit
width" pairs the package's int4 with the Q4_K_M GGUF (4-bit weights).
Results go to ``bench/results/backends.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edgemesh.lab.isolation import run_worker

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Within fifty years printing shops had opened in more than two hundred "
    "European cities, and the price of books fell so far that"
)
RESULTS = Path("bench/results")


def run(
    package: Path | None,
    gguf: Path | None,
    tokens: int,
    threads: int,
    repeats: int,
    out: Path | None,
    backends: tuple[str, ...] = ("onnxruntime", "openvino"),
) -> dict[str, Any]:
    """llama-cpp-python (the reference), edgemesh's llamacpp backend and, given a
    package, each ONNX-path backend installed here at int4 and int8."""
    from edgemesh import models
    from edgemesh.backends import registry

    gguf = gguf or models.resolve(None).path
    jobs = [("llama-cpp-python", "int4"), ("llamacpp", "int4")]
    if package is not None:
        from edgemesh.sharding.package.folder import open_package

        pkg = open_package(package)
        name, prompt = pkg.manifest.name, pkg.tokenizer().encode(PROMPT)
        quantised = [p for p in ("int4", "int8") if p in pkg.precisions]
        usable = [b for b in backends if registry.get(b).available() is None]
        jobs += [(b, p) for b in usable for p in quantised]
    else:
        from edgemesh.backends.llamacpp import GgufTokenizer

        name, prompt = gguf.stem, GgufTokenizer(gguf).encode(PROMPT)
    runs: dict[str, Any] = {}
    for backend, precision in jobs:
        key = backend if backend.startswith("llama") else f"{backend}:{precision}"
        runs[key] = _spawn(backend, package, gguf, precision, prompt, tokens, threads, repeats)
    ref = runs["llama-cpp-python"]
    ratios = {
        k: {
            "decode": round(v["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3),
            "ttft": round(v["ttft_ms"] / ref["ttft_ms"], 3),
        }
        for k, v in runs.items()
    }
    onnx_runs = {k: v for k, v in runs.items() if ":" in k}
    best = max(onnx_runs, key=lambda k: onnx_runs[k]["decode_tokens_per_s"], default=None)
    result = {
        "model": name,
        "package": str(package) if package else None,
        "gguf": str(gguf),
        "prompt_ids": prompt,
        "prompt_tokens": len(prompt),
        "tokens": tokens,
        "threads": threads,
        "repeats": repeats,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": "python -m edgemesh.bench.backends " + " ".join(sys.argv[1:]),
        "runs": runs,
        "ratios_vs_llama_cpp_python": ratios,
        "best_onnx_path": best,
        "best_onnx_decode_ratio": ratios[best]["decode"] if best else None,
        "target_decode_ratio": 0.8,
    }
    target = out or RESULTS / "backends.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}: {result['prompt_tokens']}-token prompt, {result['tokens']} tokens, "
        f"{result['threads']} threads, median of {result['repeats']}",
        f"{'engine':<22}{'decode tok/s':>13}{'TTFT ms':>10}{'x decode':>10}{'x TTFT':>9}",
    ]
    for name, r in result["runs"].items():
        ratio = result["ratios_vs_llama_cpp_python"][name]
        lines.append(
            f"{name:<22}{r['decode_tokens_per_s']:>13.1f}{r['ttft_ms']:>10.1f}"
            f"{ratio['decode']:>10.3f}{ratio['ttft']:>9.3f}"
        )
    if result["best_onnx_path"]:
        lines.append(
            f"best ONNX path {result['best_onnx_path']}: {result['best_onnx_decode_ratio']:.3f}x "
            f"llama-cpp-python decode (target {result['target_decode_ratio']})"
        )
    return "\n".join(lines)


def _spawn(
    backend: str,
    package: Path | None,
    gguf: Path,
    precision: str,
    prompt: list[int],
    tokens: int,
    threads: int,
    repeats: int,
) -> dict[str, Any]:
    job = {
        "backend": backend,
        "package": str(package) if package else None,
        "gguf": str(gguf),
        "precision": precision,
        "prompt": prompt,
        "tokens": tokens,
        "threads": threads,
        "repeats": repeats,
    }
    return run_worker("edgemesh.bench.backends", job, f"{backend}:{precision}")


# -- workers (one per subprocess) ---------------------------------------------


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM). getrusage's ru_maxrss would
    carry the parent's peak over fork+exec and make every worker look alike."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def summary(samples: list[tuple[float, float, int]], load_s: float) -> dict[str, Any]:
    """samples: (ttft_s, decode_s, tokens generated) per repeat."""
    rates = [(n - 1) / d for _, d, n in samples if n > 1 and d > 0]
    return {
        "ttft_ms": round(1000 * statistics.median(t for t, _, _ in samples), 2),
        "decode_tokens_per_s": round(statistics.median(rates), 2),
        "tokens_generated": [n for _, _, n in samples],
        "load_s": round(load_s, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def _edgemesh_worker(job: dict[str, Any]) -> dict[str, Any]:
    from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec
    from edgemesh.backends.llamacpp import LlamaCppBackend, gguf_layer_count
    from edgemesh.offline import generate
    from edgemesh.pipeline import LocalPipeline
    from edgemesh.sharding.pipeline import load_pipeline

    opts = BackendOptions(threads=job["threads"], context_length=1024, max_sequences=1)
    t0 = time.perf_counter()
    if job["backend"] == "llamacpp":
        gguf = Path(job["gguf"])
        n = gguf_layer_count(gguf)
        pipe = LocalPipeline([LlamaCppBackend(ShardSpec(gguf, LayerRange(0, n), n), opts)])
    else:
        pipe = load_pipeline(job["package"], [], job["precision"], backend=job["backend"],
                             options=opts)  # fmt: skip
    load_s = time.perf_counter() - t0
    samples = []
    try:
        generate(pipe, job["prompt"], max_tokens=4)  # warm-up: first-call allocations
        for _ in range(job["repeats"]):
            g = generate(pipe, job["prompt"], max_tokens=job["tokens"])
            samples.append((g.seconds_prefill, g.seconds_decode, len(g.token_ids)))
    finally:
        pipe.close()
    return {**summary(samples, load_s), "precision": job["precision"]}


def _llama_cpp_python_worker(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    from edgemesh.backends.llamacpp import extra_buffers_safe

    # Llama() reads llama_model_default_params(); give it the CPU-safe choice
    # edgemesh's backend loads with (AMX kernels crash in llama.cpp 0.3.x worker
    # threads, see extra_buffers_safe), so both sides run the same kernels.
    default_params = lib.llama_model_default_params

    def safe_params() -> Any:
        params = default_params()
        params.use_extra_bufts = extra_buffers_safe()
        return params

    lib.llama_model_default_params = safe_params
    t0 = time.perf_counter()
    llm = Llama(
        job["gguf"],
        n_ctx=1024,
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    samples = []
    for i in range(job["repeats"] + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(job["prompt"])
        token = llm.sample(temp=0.0)
        first = time.perf_counter()
        n = 1
        while n < job["tokens"]:
            llm.eval([token])
            token = llm.sample(temp=0.0)
            n += 1
        end = time.perf_counter()
        if i > 0:  # the first pass warms up like the edgemesh workers'
            samples.append((first - start, end - first, n))
    return {**summary(samples, load_s), "precision": "q4_k_m"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", type=Path, nargs="?")
    p.add_argument("--gguf", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        work = (
            _llama_cpp_python_worker if job["backend"] == "llama-cpp-python" else _edgemesh_worker
        )
        print(json.dumps(work(job)))
        return
    if args.package is None:
        p.error("PACKAGE is required (a folder made by `edgemesh convert`)")
    result = run(args.package, args.gguf, args.tokens, args.threads, args.repeats, args.out)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
