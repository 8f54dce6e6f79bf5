"""Figure 3: aggregate decode tokens/s against concurrent streams on one box.

``edgemesh bench throughput [--json]``. Every engine runs in its own worker
subprocess (its own peak RSS, no allocator state carried over):

* **edgemesh, onnxruntime int8** and **edgemesh, llamacpp** (the GGUF):
  the real engine (``edgemesh.local.load_service``, as ``edgemesh serve``
  builds it) with ``max_sequences`` = the largest concurrency; N requests
  submitted at once, greedy, ``ignore_eos``, the same prompt lengths.
* **llama.cpp's own batched decode** (the reference): llama-cpp-python's
  low-level API on the same GGUF, N sequences in one context, every decode
  step one ``llama_decode`` of a ``llama_batch`` holding one token of each
  sequence (what llama.cpp's ``batched`` example does), greedy.

Figures per concurrency N: *aggregate decode tokens/s* = tokens delivered
while all N streams were decoding together (from the last stream's first
token to the first stream's end), over that window; *TTFT* per stream from
the moment all N were submitted. The onnxruntime worker also times one
decode step of 16 sequences with their cache compact (as the backend keeps
it) against the same cache spread over every slot of the context (what a
static slotted cache costs a graph whose KV is concat-in, tensor-out), and
its RSS while the largest concurrency decodes (sampled every 10 ms; the
lifetime peak, loading included, is kept beside it) is set against the
planner's memory figure for the box. The reference worker also times one
prompt's prefill alone and all prompts' prefill in one call: the floor that
any schedule's TTFT p50 at N streams meets on this box.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.lab.isolation import run_worker

RESULTS = Path("bench/results")
STREAMS = (1, 4, 8, 16)
GOALS = {4: 2.5, 8: 3.5, 16: 4.0}


def _prompts(n: int, length: int, seed: int = 7) -> list[list[int]]:
    """Distinct prompts of ``length`` ordinary token ids (Gemma's vocabulary)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1000, 20000, size=length).tolist() for _ in range(n)]


# -- one engine in a worker ---------------------------------------------------


def _concurrent(engine: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """Submit every prompt at once; per-stream event times -> window rate and TTFTs."""
    from edgemesh.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    gens = [engine.submit(p, params) for p in prompts]

    def drain(i: int) -> None:
        for event in gens[i]:
            if event.token_id is not None:
                times[i].append(time.perf_counter())

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(prompts))]
    with _RssSampler() as rss:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    begin = max(ts[0] for ts in times)
    end = min(ts[-1] for ts in times)
    inside = sum(1 for ts in times for t in ts if begin < t <= end)
    ttft = sorted(ts[0] - t0 for ts in times)
    return {
        "streams": len(prompts),
        "aggregate_tok_s": round(inside / (end - begin), 2) if end > begin else None,
        "window_s": round(end - begin, 3),
        "tokens_in_window": inside,
        "ttft_p50_ms": round(1000 * float(np.median(ttft)), 1),
        "ttft_max_ms": round(1000 * ttft[-1], 1),
        "mean_batch": round(float(engine.stats.to_dict()["mean_batch"]), 2),
        "serving_rss_peak_bytes": rss.peak,
    }


class _RssSampler:
    """The process's resident set sampled every 10 ms while the streams run.

    ``ru_maxrss`` is the lifetime peak, load included (an ONNX session holds
    the model proto and its own copy of the weights for a moment); the
    planner's figure is for a box *serving* its sequences, so the
    comparison takes the peak seen while they decode."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _layout_check(backend: Any, prompt_tokens: int, context: int) -> dict[str, Any]:
    """One decode step of all slots' sequences (16 in the full run): compact cache
    vs spread over every slot of the context."""
    from edgemesh.backends.base import SeqInput

    count = backend.max_sequences
    ids = list(range(10_000, 10_000 + count))
    for sid, prompt in zip(ids, _prompts(count, prompt_tokens, 3), strict=True):
        backend.forward([SeqInput(sid, 0, tokens=np.asarray(prompt))])
    pos = prompt_tokens

    def steps(n: int) -> float:
        nonlocal pos
        t = time.perf_counter()
        for _ in range(n):
            backend.forward([SeqInput(s, pos, tokens=np.array([42])) for s in ids])
            pos += 1
        return (time.perf_counter() - t) / n

    steps(1)  # forms the group
    compact = steps(4)
    group = backend._seqs[ids[0]].group
    pad = context - 8 - group.slots  # every slot of the context (8 left for the steps)
    hosts = [backend._kv_host(t) for t in group.kv]
    shape = (hosts[0].shape[0], hosts[0].shape[1], pad, hosts[0].shape[3])
    group.kv = [backend._kv_device(np.concatenate([np.zeros(shape, np.float32), h], axis=2))
                for h in hosts]  # fmt: skip
    group.key_pos = np.concatenate([np.full((count, pad), -1, np.int64), group.key_pos], axis=1)
    spread = steps(4)
    for sid in ids:
        backend.release(sid)
    return {
        "sequences": count,
        "cached_tokens_each": pos - 4,
        "compact_step_ms": round(1000 * compact, 1),
        "all_slots_step_ms": round(1000 * spread, 1),
        "slots": context,
    }


def _planned_bytes(package: Path, precision: str, context: int, sequences: int) -> dict[str, int]:
    """The planner's memory figure for the whole model on one box (its formula)."""
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.costs import KV_SCALE, RUNTIME_OVERHEAD_BYTES, weight_at

    m = Manifest.load(package)
    weights = sum(int(c.weight_bytes[precision]) for c in m.layers)
    weights += weight_at(m.embedding, precision) + weight_at(m.head, precision)
    kv = int(sum(c.kv_bytes_per_token for c in m.layers) * KV_SCALE[precision] * context
             * sequences)  # fmt: skip
    return {"weights": weights, "kv": kv, "overhead": RUNTIME_OVERHEAD_BYTES,
            "total": weights + kv + RUNTIME_OVERHEAD_BYTES}  # fmt: skip


def _engine_worker(job: dict[str, Any]) -> dict[str, Any]:
    from edgemesh.limits import ServingLimits
    from edgemesh.local import LocalOptions, load_service
    from edgemesh.models import ModelSource

    streams, context = job["streams"], job["context"]
    kind = "gguf" if job["engine"] == "llamacpp" else "package"
    options = LocalOptions(
        ServingLimits(
            threads=job["threads"],
            context_length=context,
            max_sequences=max(streams),
            max_queue=64,
        ),
        backend=None if kind == "gguf" else "onnxruntime",
        precision=None if kind == "gguf" else job["precision"],
    )
    service = load_service(ModelSource("bench", Path(job["model"]), kind), options)
    out: dict[str, Any] = {"engine": job["engine"], "runs": {}}
    try:
        _concurrent(service.engine, _prompts(1, job["prompt_tokens"], 99), 4)  # warm-up
        for n in streams:
            out["runs"][str(n)] = _concurrent(
                service.engine, _prompts(n, job["prompt_tokens"]), job["tokens"]
            )
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["serving_rss_peak_bytes"] = out["runs"][str(max(streams))]["serving_rss_peak_bytes"]
        if kind == "package":
            # The planner budgets every sequence's KV at the full context; the
            # runs above fill a third of it. So the memory check also runs the
            # widest concurrency to the end of the context.
            n, prompt = max(streams), job["prompt_tokens"]
            full = context - prompt - 2
            widest = _concurrent(service.engine, _prompts(n, prompt, 5), full)
            out["full_context"] = {
                "streams": n,
                "tokens_each": prompt + full,
                "serving_rss_peak_bytes": widest["serving_rss_peak_bytes"],
            }
            backend = service.engine.pipeline.backends[0]
            out["layout"] = _layout_check(backend, job["prompt_tokens"], context)
            out["planned"] = _planned_bytes(
                Path(job["model"]), job["precision"], context, max(streams)
            )
    finally:
        service.close()
    return out


# -- llama.cpp's own batched decode, straight through the C API -----------------


def _llamacpp_worker(job: dict[str, Any]) -> dict[str, Any]:
    from edgemesh.backends.llamacpp import _lib, model_params

    llama = _lib()
    model = llama.llama_model_load_from_file(job["model"].encode(), model_params(llama))
    vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    out: dict[str, Any] = {"engine": "llama.cpp batched (low-level API)", "runs": {}}
    try:
        for n in job["streams"]:
            out["runs"][str(n)] = _llamacpp_batched(llama, model, vocab, n, job)
        out["prefill"] = _prefill_floor(llama, model, max(job["streams"]), job)
    finally:
        llama.llama_model_free(model)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _prefill_floor(llama: Any, model: Any, n: int, job: dict) -> dict[str, Any]:
    """How low TTFT p50 at ``n`` streams can go on this box, from its prefill speed.

    The median stream's first token needs, under any schedule, at least half
    of the ``n`` prompts prefilled (the median is the n/2-th and n/2+1-th
    first tokens). So p50 >= (n/2 + 1/2) prompts' worth of prefill at the best
    rate this box reaches, which is all ``n`` prompts in one ``llama_decode``
    (the widest batch). Measured: one prompt alone, and all ``n`` in one call."""
    prompts = _prompts(n, job["prompt_tokens"], seed=3)

    def timed(rows: list[tuple[int, int, int]], seqs: int) -> float:
        cparams = llama.llama_context_default_params()
        cparams.n_seq_max = seqs
        cparams.n_ctx = job["context"] * seqs
        cparams.n_batch = cparams.n_ubatch = max(512, len(rows))
        cparams.n_threads = cparams.n_threads_batch = job["threads"]
        ctx = llama.llama_init_from_model(model, cparams)
        batch = llama.llama_batch_init(len(rows), 0, 1)
        try:
            best = float("inf")
            for _ in range(3):
                llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
                batch.n_tokens = len(rows)
                for k, (tok, pos, seq) in enumerate(rows):
                    batch.token[k], batch.pos[k] = tok, pos
                    batch.n_seq_id[k], batch.seq_id[k][0] = 1, seq
                    batch.logits[k] = pos == job["prompt_tokens"] - 1
                t0 = time.perf_counter()
                if llama.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                best = min(best, time.perf_counter() - t0)
            return best
        finally:
            llama.llama_batch_free(batch)
            llama.llama_free(ctx)

    one = timed([(t, i, 0) for i, t in enumerate(prompts[0])], 1)
    every = timed([(t, i, s) for s, p in enumerate(prompts) for i, t in enumerate(p)], n)
    floor = (n / 2 + 0.5) * (every / n) / one
    return {
        "streams": n,
        "one_prompt_ms": round(1000 * one, 1),
        "all_prompts_one_call_ms": round(1000 * every, 1),
        "ttft_p50_floor_vs_1": round(floor, 2),
    }


def _llamacpp_batched(llama: Any, model: Any, vocab: int, n: int, job: dict) -> dict[str, Any]:
    cparams = llama.llama_context_default_params()
    cparams.n_seq_max = n
    cparams.n_ctx = job["context"] * n
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = job["threads"]
    ctx = llama.llama_init_from_model(model, cparams)
    batch = llama.llama_batch_init(512, 0, 1)
    prompts = _prompts(n, job["prompt_tokens"])
    try:

        def decode(items: list[tuple[int, int, int]]) -> list[int]:
            """(token, position, sequence) per row; greedy next token of each row."""
            batch.n_tokens = len(items)
            for k, (tok, pos, seq) in enumerate(items):
                batch.token[k], batch.pos[k] = tok, pos
                batch.n_seq_id[k], batch.seq_id[k][0], batch.logits[k] = 1, seq, True
            if llama.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return [
                int(np.argmax(np.ctypeslib.as_array(llama.llama_get_logits_ith(ctx, k),
                                                    shape=(vocab,))))
                for k in range(len(items))
            ]  # fmt: skip

        t0 = time.perf_counter()
        last = []
        for s, p in enumerate(prompts):  # each prompt in one decode, as the engine feeds them
            last.append(decode([(t, i, s) for i, t in enumerate(p)])[-1])
        ttft = time.perf_counter() - t0
        pos = job["prompt_tokens"]
        t1 = time.perf_counter()
        steps = job["tokens"] - 1
        for _ in range(steps):
            last = decode([(last[s], pos, s) for s in range(n)])
            pos += 1
        seconds = time.perf_counter() - t1
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)
    return {
        "streams": n,
        "aggregate_tok_s": round(n * steps / seconds, 2),
        "window_s": round(seconds, 3),
        "all_prompts_ms": round(1000 * ttft, 1),
    }


# -- the run ---------------------------------------------------------------------


def run(
    *,
    package: Path | None = None,
    model: str | None = None,
    streams: tuple[int, ...] = STREAMS,
    tokens: int = 48,
    prompt_tokens: int = 32,
    threads: int | None = None,
    context: int = 256,
    out: Path | None = None,
) -> dict[str, Any]:
    from edgemesh import models

    gguf = models.resolve(model).path
    package = package or models.default_package()
    threads = threads or len(os.sched_getaffinity(0))
    base = {"streams": list(streams), "tokens": tokens, "prompt_tokens": prompt_tokens,
            "threads": threads, "context": context}  # fmt: skip
    load_start = round(os.getloadavg()[0], 2)
    engines: dict[str, Any] = {}
    for name, module_job in (
        ("llama.cpp batched (reference)", {"kind": "llamacpp", "model": str(gguf)}),
        ("edgemesh onnxruntime int8",
         {"kind": "engine", "engine": "onnxruntime", "precision": "int8", "model": str(package)}),
        ("edgemesh llamacpp", {"kind": "engine", "engine": "llamacpp", "model": str(gguf)}),
    ):  # fmt: skip
        print(f"[throughput] {name}", file=sys.stderr, flush=True)
        engines[name] = run_worker("edgemesh.bench.throughput", {**base, **module_job}, name)
    ref = engines["llama.cpp batched (reference)"]["runs"]
    for result in engines.values():
        runs = result["runs"]
        one = runs[str(streams[0])]["aggregate_tok_s"]
        for n, r in runs.items():
            r["vs_1_stream"] = round(r["aggregate_tok_s"] / one, 2) if one else None
            r["vs_llama_cpp_batched"] = (
                round(r["aggregate_tok_s"] / ref[n]["aggregate_tok_s"], 2) if n in ref else None
            )
        if "16" in runs and "1" in runs and "ttft_p50_ms" in runs["1"]:
            result["ttft_p50_16_vs_1"] = round(
                runs["16"]["ttft_p50_ms"] / runs["1"]["ttft_p50_ms"], 2
            )
        if "planned" in result:
            result["peak_rss_vs_planned"] = round(
                result["peak_rss_bytes"] / result["planned"]["total"], 3
            )
            result["serving_rss_vs_planned"] = round(
                result["serving_rss_peak_bytes"] / result["planned"]["total"], 3
            )
        if "full_context" in result and "planned" in result:
            fc = result["full_context"]
            fc["vs_planned"] = round(fc["serving_rss_peak_bytes"] / result["planned"]["total"], 3)
    result = {
        "model": Path(gguf).name,
        "package": str(package),
        **base,
        "engines": engines,
        "goals_vs_1_stream": GOALS,
        "mesh": "not measured by this command: see figure 2/3's mesh rows (bench/mesh.py)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_1m_start": load_start,
        "load_1m_end": round(os.getloadavg()[0], 2),
        "command": "edgemesh bench throughput "
        + " ".join(sys.argv[3:] if "bench" in sys.argv[1:3] else sys.argv[1:]),
    }
    target = out or RESULTS / "throughput.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    return result


def f_mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def render(result: dict[str, Any]) -> str:
    streams = result["streams"]
    lines = [
        f"{result['model']}: {result['prompt_tokens']}-token prompts, {result['tokens']} greedy "
        f"tokens per stream, {result['threads']} threads; load {result['load_1m_start']} -> "
        f"{result['load_1m_end']}",
        f"{'engine':<32}" + "".join(f"{n:>9}" for n in streams) + "   (aggregate decode tok/s)",
    ]
    for name, r in result["engines"].items():
        runs = r["runs"]
        lines.append(
            f"{name:<32}" + "".join(f"{runs[str(n)]['aggregate_tok_s']:>9}" for n in streams)
        )
        ratios = "".join(f"{runs[str(n)]['vs_1_stream']:>9}" for n in streams)
        lines.append(f"{'  x one stream':<32}" + ratios)
        if "ttft_p50_16_vs_1" in r:
            lines.append(f"  TTFT p50 at 16 vs 1 stream: {r['ttft_p50_16_vs_1']}x")
        if "prefill" in r:
            f = r["prefill"]
            lines.append(
                f"  prefill: one prompt {f['one_prompt_ms']} ms, all {f['streams']} in one call "
                f"{f['all_prompts_one_call_ms']} ms -> no schedule gets TTFT p50 at "
                f"{f['streams']} below {f['ttft_p50_floor_vs_1']}x one stream here"
            )
        if "peak_rss_vs_planned" in r:
            lines.append(
                f"  RSS serving {f_mb(r['serving_rss_peak_bytes'])} ({r['serving_rss_vs_planned']}x"
                f" the planner's {f_mb(r['planned']['total'])}); lifetime peak incl. load "
                f"{f_mb(r['peak_rss_bytes'])} ({r['peak_rss_vs_planned']}x)"
            )
        if "vs_planned" in r.get("full_context", {}):
            fc = r["full_context"]
            lines.append(
                f"  RSS with {fc['streams']} sequences at {fc['tokens_each']} of "
                f"{result['context']} tokens: {f_mb(fc['serving_rss_peak_bytes'])} "
                f"({fc['vs_planned']}x the planner's figure)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--package", type=Path)
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--streams", default=",".join(map(str, STREAMS)))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        worker = _llamacpp_worker if job["kind"] == "llamacpp" else _engine_worker
        print(json.dumps(worker(job)))
        return
    streams = tuple(int(n) for n in args.streams.split(","))
    result = run(
        package=args.package,
        model=args.model,
        streams=streams,
        tokens=args.tokens,
        threads=args.threads,
    )
    print(json.dumps(result, indent=1) if args.json else render(result))


if __name__ == "__main__":
    main()
