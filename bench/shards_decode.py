"""Decode speed of a converted package on onnxruntime, per precision, against
llama-cpp-python on the GGUF it came from (the numbers in docs/SHARDS.md).

    python -m edgemesh.bench.shards_decode PACKAGE [--gguf FILE] [--threads 2]

Each engine decodes the same prompt greedily for ``--tokens`` tokens (EOS
ignored on the ONNX side; llama.cpp stops only at EOS, which a prose prompt
does not reach in 64 tokens); decode tokens/s counts the tokens after the
first over the time after the first. The median of ``--repeats`` runs is
printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

PROMPT = "The history of the printing press begins"


def onnx_decode(
    package: Path, precision: str, tokens: int, threads: int, repeats: int, **backend_kw: Any
) -> dict[str, Any]:
    from edgemesh.backends.base import BackendOptions
    from edgemesh.offline import generate
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    pkg = open_package(package)
    ids = pkg.tokenizer().encode(PROMPT)
    t0 = time.perf_counter()
    pipe = load_pipeline(pkg, [], precision, options=BackendOptions(threads=threads))
    load_s = time.perf_counter() - t0
    try:
        generate(pipe, ids, max_tokens=4)  # warm-up: first-run allocations
        runs = [generate(pipe, ids, max_tokens=tokens) for _ in range(repeats)]
    finally:
        pipe.close()
    return {
        "engine": f"onnxruntime/{precision}",
        "load_s": round(load_s, 2),
        "prefill_s": round(statistics.median(r.seconds_prefill for r in runs), 4),
        "decode_tokens_per_s": round(statistics.median(r.decode_tokens_per_s for r in runs), 2),
    }


def llamacpp_decode(gguf: Path, tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    from edgemesh.backends.llamacpp import extra_buffers_safe

    # The CPU-safe model parameters edgemesh's llama.cpp backend loads with
    # (AMX kernels die with SIGILL on some CPUs; see extra_buffers_safe).
    default_params = lib.llama_model_default_params

    def safe_params() -> Any:
        params = default_params()
        params.use_extra_bufts = extra_buffers_safe()
        return params

    lib.llama_model_default_params = safe_params
    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    rates = []
    for _ in range(repeats + 1):
        llm.reset()
        stamps = []
        for _chunk in llm.create_completion(
            PROMPT, max_tokens=tokens, temperature=0.0, stream=True
        ):
            stamps.append(time.perf_counter())
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "engine": "llama.cpp/q4_k_m",
        "decode_tokens_per_s": round(statistics.median(rates[1:]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the default model")
    parser.add_argument("--precisions", default="fp32,fp16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.gguf is None:
        from edgemesh.models import default_model_path

        args.gguf = default_model_path()
    results = [llamacpp_decode(args.gguf, args.tokens, args.threads, args.repeats)]
    for p in args.precisions.split(","):
        results.append(onnx_decode(args.package, p, args.tokens, args.threads, args.repeats))
    ref = results[0]["decode_tokens_per_s"]
    for r in results[1:]:
        r["vs_llamacpp"] = round(r["decode_tokens_per_s"] / ref, 3)
    print(json.dumps({"threads": args.threads, "tokens": args.tokens, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
