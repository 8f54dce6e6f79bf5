"""Figure 1: one box, the default model — edgemesh against llama-cpp-python.

The engine figures come from ``bench/backends.py`` (each engine in its own
subprocess, so peak RSS is its own and no two models share the cores; same
prompt ids, same thread count, greedy; median of ``repeats``): the
reference is llama-cpp-python's own API on the GGUF; edgemesh runs its
llamacpp backend on the same GGUF and every installed ONNX-path backend on
the converted package at int4 and int8. On top, the whole HTTP path: the
gateway streaming a completion from the llamacpp backend, as `edgemesh serve`
does. ``ratio`` is the best ONNX-path backend's decode speed over llama.cpp's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgemesh.bench import backends
from edgemesh.reexec import edgemesh_argv, module_argv

RESULTS = Path("bench/results")


def run(
    *,
    model: str | None,
    package: Path | None,
    tokens: int,
    threads: int | None,
    repeats: int,
    out: Path | None,
    onnx: bool = True,
) -> dict[str, Any]:
    from edgemesh import models
    from edgemesh.errors import ConfigError

    source = models.resolve(model)
    if source.kind != "gguf":
        raise ConfigError("--model must be a GGUF file (llama.cpp is the reference)")
    threads = threads or len(os.sched_getaffinity(0))
    if onnx and package is None:
        if model not in (None, models.DEFAULT_MODEL):
            raise ConfigError("pass --package: the ONNX package converted from --model")
        package = models.default_package()
    base = backends.run(
        package if onnx else None, source.path, tokens, threads, repeats, RESULTS / "backends.json"
    )
    runs = dict(base["runs"])
    runs["gateway-llamacpp"] = _spawn_gateway(
        source.path, base["prompt_ids"], tokens, threads, repeats
    )
    ref = runs["llama-cpp-python"]["decode_tokens_per_s"]
    gateway = runs["gateway-llamacpp"]["decode_tokens_per_s"]
    best = base["best_onnx_path"]
    result: dict[str, Any] = {
        "model": source.name,
        "package": base["package"],
        "prompt_tokens": base["prompt_tokens"],
        "tokens": tokens,
        "threads": threads,
        "repeats": repeats,
        "machine": base["machine"],
        "command": "edgemesh bench single " + " ".join(sys.argv[3:]),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "runs": runs,
        "llamacpp_tokens_per_s": ref,
        "gateway_tokens_per_s": gateway,
        "gateway_ratio": round(gateway / ref, 3),
        "edgemesh_tokens_per_s": runs[best]["decode_tokens_per_s"] if best else gateway,
        "backend": best.split(":")[0] if best else "llamacpp",
        "precision": best.split(":")[1] if best else "q4_k_m",
    }
    result["ratio"] = round(result["edgemesh_tokens_per_s"] / ref, 3)
    target = out or RESULTS / "single.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['model']}, {result['prompt_tokens']}-token prompt, {result['tokens']} "
        f"tokens, {result['threads']} threads, median of {result['repeats']}",
        f"{'engine':<22}{'precision':>10}{'decode tok/s':>14}{'TTFT ms':>10}{'peak RSS MB':>13}",
    ]
    for name, r in result["runs"].items():
        lines.append(
            f"{name:<22}{r['precision']:>10}{r['decode_tokens_per_s']:>14.1f}"
            f"{r['ttft_ms']:>10.1f}{r['peak_rss_mb']:>13.0f}"
        )
    lines.append(f"gateway (HTTP, llamacpp) / llama.cpp = {result['gateway_ratio']:.3f}")
    lines.append(
        f"edgemesh best ONNX path ({result['backend']} {result['precision']}) / llama.cpp = "
        f"{result['ratio']:.3f}"
    )
    return "\n".join(lines)


def _spawn_gateway(
    gguf: Path, prompt: list[int], tokens: int, threads: int, repeats: int
) -> dict[str, Any]:
    job = {"gguf": str(gguf), "prompt": prompt, "tokens": tokens, "threads": threads}
    job["repeats"] = repeats
    cmd = module_argv("edgemesh.bench.single", json.dumps(job))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker gateway-llamacpp failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gateway_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Stream completions over HTTP from `edgemesh serve` in its own process,
    as a client would (a client in the server's process would compete with it
    for the GIL and halve what the server can do)."""
    import signal
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = edgemesh_argv("serve", "--model", job["gguf"], "--port", str(port))
    argv += ["--threads", str(job["threads"]), "--context", "1024", "--log-level", "warning"]
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"edgemesh serve exited: {server.stderr.read().decode()[-2000:]}"
                )
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        load_s = time.perf_counter() - t0
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        def timed(max_tokens: int) -> tuple[float, float, int]:
            body = {"model": model, "prompt": job["prompt"], "max_tokens": max_tokens}
            body |= {"temperature": 0.0, "stream": True, "ignore_eos": True}
            start = time.perf_counter()
            first = last = 0.0
            n = 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        last = time.perf_counter()
                        first = first or last
                        n += 1
            return first - start, last - first, n

        timed(4)  # warm-up, as the other workers do
        samples = [timed(job["tokens"]) for _ in range(job["repeats"])]
        peak = backends.peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    return {**backends.summary(samples, load_s), "peak_rss_mb": peak, "precision": "q4_k_m"}


if __name__ == "__main__":
    print(json.dumps(_gateway_worker(json.loads(sys.argv[1]))))
