"""Figure 1: one box, the default model — edgemesh against llama-cpp-python.

Each engine runs in its own subprocess (so peak RSS is its own and no two
models share the cores), decodes the same prompt greedily with the same
thread count, and reports time-to-first-token and decode tokens/s (tokens
after the first, over the time after the first). The median of
``repeats`` runs is kept. Reference: llama-cpp-python's own high-level
``Llama.create_completion`` on the same GGUF.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = "The history of the printing press begins"
RESULTS = Path("bench/results")


def run(
    *, model: str | None, tokens: int, threads: int | None, repeats: int, out: Path | None
) -> dict[str, Any]:
    from edgemesh import models

    source = models.resolve(model)
    threads = threads or len(os.sched_getaffinity(0))
    runs: dict[str, Any] = {}
    for worker in ("llamacpp-direct", "gateway-llamacpp"):
        runs[worker] = _spawn(worker, source.path, tokens, threads, repeats)
    ref = runs["llamacpp-direct"]["decode_tokens_per_s"]
    gateway = runs["gateway-llamacpp"]["decode_tokens_per_s"]
    onnx = {k: v for k, v in runs.items() if k.startswith("onnx:")}
    best = max(onnx.items(), key=lambda kv: kv[1]["decode_tokens_per_s"], default=None)
    result: dict[str, Any] = {
        "model": source.name,
        "tokens": tokens,
        "threads": threads,
        "repeats": repeats,
        "machine": _machine(),
        "command": "edgemesh bench single " + " ".join(sys.argv[3:]),
        "runs": runs,
        "llamacpp_tokens_per_s": ref,
        "gateway_tokens_per_s": gateway,
        "gateway_ratio": round(gateway / ref, 3),
        "edgemesh_tokens_per_s": best[1]["decode_tokens_per_s"] if best else gateway,
        "backend": best[0].split(":")[1] if best else "llamacpp",
        "precision": best[1]["precision"] if best else "q4_k_m",
    }
    result["ratio"] = round(result["edgemesh_tokens_per_s"] / ref, 3)
    target = out or RESULTS / "single.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, {result['tokens']} tokens, {result['threads']} threads",
        f"{'engine':<22}{'decode tok/s':>14}{'TTFT ms':>10}{'peak RSS MB':>13}",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"{name:<22}{r['decode_tokens_per_s']:>14.1f}{r['ttft_ms']:>10.1f}"
            f"{r['peak_rss_mb']:>13.0f}"
        )
    lines.append(f"gateway / llama.cpp = {result['gateway_ratio']:.3f}")
    lines.append(f"edgemesh ({result['backend']}) / llama.cpp = {result['ratio']:.3f}")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def _spawn(worker: str, model: Path, tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "edgemesh.bench.single",
        worker,
        str(model),
        str(tokens),
        str(threads),
        str(repeats),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {worker} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(samples: list[tuple[float, float, int]]) -> dict[str, Any]:
    """samples: (ttft_s, decode_s, tokens) per repeat -> medians."""
    rates = [(n - 1) / d for _, d, n in samples if n > 1 and d > 0]
    return {
        "ttft_ms": round(1000 * statistics.median(t for t, _, _ in samples), 2),
        "decode_tokens_per_s": round(statistics.median(rates), 2) if rates else 0.0,
        "tokens_generated": [n for _, _, n in samples],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _timed(stream: Any) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    n = 0
    for _ in stream:
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    assert first is not None and last is not None, "the engine produced no tokens"
    return first - start, last - first, n


def _llamacpp_direct(model: Path, tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    from edgemesh.backends.llamacpp import extra_buffers_safe

    # Llama() takes its model parameters from llama_model_default_params(); give
    # it the CPU-safe choice edgemesh's backend loads with (see
    # extra_buffers_safe), so both sides run the same kernels.
    default_params = lib.llama_model_default_params

    def safe_params() -> Any:
        params = default_params()
        params.use_extra_bufts = extra_buffers_safe()
        return params

    lib.llama_model_default_params = safe_params
    llm = Llama(
        str(model),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    samples = []
    for _ in range(repeats):
        llm.reset()
        stream = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True)
        samples.append(_timed(stream))
    return {**_summarise(samples), "precision": "q4_k_m"}


def _gateway(model: Path, tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    import socket

    import httpx
    import uvicorn

    from edgemesh.gateway import create_app
    from edgemesh.local import LocalOptions, load_service
    from edgemesh.models import ModelSource

    service = load_service(
        ModelSource("m", model, "gguf"),
        LocalOptions(threads=threads, context_length=2048, max_sequences=4),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app([service]), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
    }

    def stream() -> Any:
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    yield line

    try:
        samples = [_timed(stream()) for _ in range(repeats)]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    return {**_summarise(samples), "precision": "q4_k_m"}


_WORKERS = {"llamacpp-direct": _llamacpp_direct, "gateway-llamacpp": _gateway}


def _main(argv: list[str]) -> None:
    worker, model, tokens, threads, repeats = argv
    result = _WORKERS[worker](Path(model), int(tokens), int(threads), int(repeats))
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
