"""The gateway's costs, in one run on the default model (Gemma 3 270M, 262,144 tokens).

``edgemesh bench gateway`` / ``python -m edgemesh.bench.gateway``:

1. **Grammar engines**: the per-token time to compute the allowed-token mask
   over the full vocabulary while a fixed JSON document (valid for a fixed
   schema) is fed token by token, for llguidance (what edgemesh uses) and,
   where installed, xgrammar and outlines-core; plus each one's one-off
   set-up (tokenizer + schema compile).
2. **Constrained vs free decoding**: the real engine on llama.cpp, greedy,
   the same prompts, decode ms per token without a grammar and with a JSON
   schema grammar (mask on the head, applied to the logits in the Pick).
3. **Gateway vs backend**: the same greedy request (32 tokens) submitted to
   the engine in-process, and through HTTP with the official openai client,
   plain and streamed: the difference is the gateway's overhead.

Results: bench/results/gateway.json (with the 1-minute load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULT = Path(__file__).resolve().parent / "results" / "gateway.json"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["mathematician", "writer", "analyst"],
    "address": {"city": "London", "zip": "W1"},
}
PROMPTS = ["Describe a person as JSON.", "Give me a user record.", "A JSON profile, please."]


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_us": round(1e6 * statistics.fmean(ordered), 1),
        "p50_us": round(1e6 * ordered[len(ordered) // 2], 1),
        "p99_us": round(1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def grammar_engines(tokenizer: Any) -> dict[str, Any]:
    from edgemesh.grammar import COMPACT

    text = json.dumps(DOCUMENT, separators=(", ", ": "))
    ids = tokenizer.encode(text, add_bos=False)
    vocab = tokenizer.vocab_size
    out: dict[str, Any] = {"vocab": vocab, "tokens": len(ids)}

    # llguidance
    import llguidance as llg
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    from edgemesh import grammar

    t0 = time.perf_counter()
    lltok = grammar.grammar_tokenizer(tokenizer)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = llg.LLMatcher(
        lltok, llg.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=COMPACT)
    )
    t_compile = time.perf_counter() - t0
    mask = allocate_token_bitmask(1, lltok.vocab_size)
    times = []
    for t in ids:
        a = time.perf_counter()
        fill_next_token_bitmask(matcher, mask)
        times.append(time.perf_counter() - a)
        assert matcher.consume_token(t), matcher.get_error()
    out["llguidance"] = {
        "version": llg.__version__ if hasattr(llg, "__version__") else "",
        "tokenizer_s": round(t_tok, 3),
        "compile_s": round(t_compile, 4),
        **_ms(times),
    }
    tokens = [tokenizer.token_bytes(i) for i in range(vocab)]
    try:
        import torch  # noqa: F401  (xgrammar's masks are torch tensors)
        import xgrammar as xgr
    except ImportError as exc:
        out["xgrammar"] = {"skipped": f"not installed ({exc})"}
    else:
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo(
            tokens,
            vocab_type=xgr.VocabType.RAW,
            vocab_size=vocab,
            stop_token_ids=sorted(tokenizer.eos_ids),
        )
        compiler = xgr.GrammarCompiler(info)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        t_compile = time.perf_counter() - t0
        m = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            a = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - a)
            assert m.accept_token(t)
        out["xgrammar"] = {
            "tokenizer_s": round(t_tok, 3),
            "compile_s": round(t_compile, 4),
            **_ms(times),
        }
    try:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as exc:
        out["outlines_core"] = {"skipped": f"not installed ({exc})"}
    else:
        eos = min(tokenizer.eos_ids)
        t0 = time.perf_counter()
        index_vocab: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokens):
            if b and i not in tokenizer.eos_ids:
                index_vocab.setdefault(b, []).append(i)
        vocabulary = oc.Vocabulary(eos, index_vocab)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(SCHEMA))
        guide = oc.Guide(oc.Index(regex, vocabulary))
        t_compile = time.perf_counter() - t0
        times = []
        for t in ids:
            a = time.perf_counter()
            guide.get_tokens()
            times.append(time.perf_counter() - a)
            guide.advance(t)
        out["outlines_core"] = {
            "tokenizer_s": round(t_tok, 3),
            "compile_s": round(t_compile, 4),
            **_ms(times),
            "note": "regular expressions only (no CFG)",
        }
    return out


def _decode_ms(
    engine: Any, ids: list[int], params: Any, constraint: Any = None
) -> tuple[float, int]:
    """(ms per decoded token after the first, tokens) for one request alone on the engine."""
    gen = engine.submit(ids, params, constraint=constraint)
    stamps = [time.perf_counter() for e in gen if e.token_id is not None]
    n = gen.completion_tokens
    if len(stamps) < 2:
        return float("nan"), n
    return 1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1), n


def constrained_vs_free(service: Any, tokens: int) -> dict[str, Any]:
    from edgemesh.grammar import json_schema_grammar
    from edgemesh.sampling import SamplingParams

    tok = service.tokenizer
    # minItems keeps the grammar open for all `tokens`, so both runs decode as many.
    grammar = json_schema_grammar(
        {"type": "array", "items": {"type": "string"}, "minItems": 1000},
        tokenizer=tok,
        param="bench",
    )
    free, constrained, n_free, n_con = [], [], [], []
    for prompt in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        ms, n = _decode_ms(service.engine, ids, params)
        free.append(ms)
        n_free.append(n)
        ms, n = _decode_ms(service.engine, ids, params, grammar.constraint())
        constrained.append(ms)
        n_con.append(n)
    f, c = statistics.median(free), statistics.median(constrained)
    return {
        "free_ms_per_token": round(f, 2),
        "constrained_ms_per_token": round(c, 2),
        "overhead_ms_per_token": round(c - f, 3),
        "overhead_pct": round(100 * (c - f) / f, 1),
        "tokens_free": n_free,
        "tokens_constrained": n_con,
        "grammar": "JSON array of at least 1000 strings (compact layout)",
    }


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port in a thread, as `edgemesh serve` runs it."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def gateway_vs_engine(service: Any, tokens: int, repeats: int) -> dict[str, Any]:
    import openai

    from edgemesh.gateway import create_app
    from edgemesh.sampling import SamplingParams

    prompt = "The history of the printing press"
    ids = service.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    direct, plain, streamed = [], [], []
    with _serve(create_app([service])) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        kw = {
            "model": service.name,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        client.completions.create(**kw)  # warm the connection
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(service.engine.submit(ids, params))
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = client.completions.create(**kw)
            plain.append(time.perf_counter() - t0)
            assert out.usage.completion_tokens == tokens
            t0 = time.perf_counter()
            for _chunk in client.completions.create(stream=True, **kw):
                pass
            streamed.append(time.perf_counter() - t0)
    d, p, s = (statistics.median(x) * 1000 for x in (direct, plain, streamed))
    return {
        "tokens": tokens,
        "repeats": repeats,
        "engine_ms": round(d, 1),
        "http_ms": round(p, 1),
        "http_stream_ms": round(s, 1),
        "overhead_ms": round(p - d, 1),
        "overhead_stream_ms": round(s - d, 1),
        "overhead_ms_per_token": round((s - d) / tokens, 3),
    }


def shared_prefill(service: Any, n: int = 4, prompt_tokens: int = 300) -> dict[str, Any]:
    """n samples of one long prompt: each prefilled alone vs sample 0's KV forked."""
    from edgemesh.sampling import SamplingParams

    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    ids = service.tokenizer.encode(text)[:prompt_tokens]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine = service.engine
    times: dict[str, list[float]] = {"independent": [], "shared": []}
    for _ in range(2):
        for mode in ("independent", "shared"):
            forks = engine.stats.forks
            t0 = time.perf_counter()
            first = engine.submit(ids, params)
            gens = [first] + [
                engine.submit(ids, params, share_prefill=first if mode == "shared" else None)
                for _ in range(n - 1)
            ]
            for g in gens:
                list(g)
            times[mode].append(time.perf_counter() - t0)
            if mode == "shared":
                assert engine.stats.forks == forks + n - 1
    i, s = (min(times[m]) * 1000 for m in ("independent", "shared"))
    return {
        "n": n,
        "prompt_tokens": len(ids),
        "max_tokens": 4,
        "independent_ms": round(i, 1),
        "shared_ms": round(s, 1),
        "speedup": round(i / s, 2),
    }


def run(tokens: int, repeats: int, threads: int, out: Path) -> dict[str, Any]:
    from edgemesh.limits import ServingLimits
    from edgemesh.local import LocalOptions, load_service
    from edgemesh.models import resolve

    load = [round(os.getloadavg()[0], 2)]
    service = load_service(
        resolve(None),
        LocalOptions(ServingLimits(threads=threads, context_length=1024, max_sequences=4)),
    )
    try:
        result: dict[str, Any] = {
            "command": "edgemesh bench gateway",
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "threads": threads,
            },
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "model": service.name,
            "grammar_engines": grammar_engines(service.tokenizer),
            "constrained_vs_free": constrained_vs_free(service, tokens),
            "gateway_vs_engine": gateway_vs_engine(service, tokens, repeats),
            "shared_prefill": shared_prefill(service),
        }
    finally:
        service.close()
    load.append(round(os.getloadavg()[0], 2))
    result["loadavg_1m"] = load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def figure(result: dict[str, Any] | None) -> str:
    """The BENCHMARKS.md section."""
    head = "\n## Gateway: constrained decoding and HTTP overhead\n"
    if result is None:
        return head + "\n_Not measured yet: run `edgemesh bench gateway`._\n"
    g = result["grammar_engines"]
    rows = []
    for name in ("llguidance", "xgrammar", "outlines_core"):
        e = g.get(name, {})
        if "skipped" in e:
            rows.append(f"| {name} | {e['skipped']} | | | |")
        elif e:
            rows.append(
                f"| {name} | {e['mean_us']} | {e['p99_us']} | {e['compile_s']} | "
                f"{e['tokenizer_s']} |"
            )
    c = result["constrained_vs_free"]
    w = result["gateway_vs_engine"]
    return (
        head + f"\nMask per token over {g['vocab']:,} tokens "
        f"({g['tokens']} tokens of a JSON document):\n\n"
        "| engine | mean µs | p99 µs | schema compile s | tokenizer set-up s |\n"
        "|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nDecode on llama.cpp, greedy: free {c['free_ms_per_token']} ms/token, JSON-schema "
        f"constrained {c['constrained_ms_per_token']} ms/token "
        f"(overhead {c['overhead_ms_per_token']} ms, {c['overhead_pct']} %).\n\n"
        f"{w['tokens']} tokens: engine in-process {w['engine_ms']} ms; through the gateway "
        f"{w['http_ms']} ms plain, {w['http_stream_ms']} ms streamed "
        f"(overhead {w['overhead_ms']} / "
        f"{w['overhead_stream_ms']} ms).\n"
        + _prefill_line(result.get("shared_prefill"))
        + f"\n_Command:_ `{result['command']}`  \n_Machine:_ {result['machine']} "
        f"{result['measured_at']}, load average {result['loadavg_1m']}\n"
    )


def _prefill_line(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    return (
        f"\nn={p['n']} samples of a {p['prompt_tokens']}-token prompt ({p['max_tokens']} tokens "
        f"each): {p['independent_ms']} ms prefilling each, {p['shared_ms']} ms sharing sample 0's "
        f"prefill (x{p['speedup']}).\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    result = run(args.tokens, args.repeats, args.threads, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
