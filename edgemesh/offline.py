"""One request at a time through the engine: ``generate`` and perplexity.

``edgemesh generate``, the benchmarks, the converter's accuracy check and
``edgemesh slim`` run a single prompt over a pipeline they opened
(``edgemesh.sharding.pipeline.load_pipeline``). They take the same decode
loop as ``edgemesh serve`` (``edgemesh.engine.Engine``: the same sampler,
top-k, penalties, stop strings, end-of-sequence handling), opened for one
request and closed again; the pipeline stays open for the next call.

Perplexity scores a text with the engine's prompt scoring (``echo``: the
log-probability of every prompt token given its prefix), fed in chunks so
the KV cache carries the whole prefix and memory stays ``chunk x V``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgemesh.engine import Engine, Event
from edgemesh.errors import ConfigError
from edgemesh.limits import ServingLimits
from edgemesh.pipeline import Pipeline
from edgemesh.sampling import SamplingParams
from edgemesh.tokenizer import Tokenizer

DEFAULT_CHUNK = 256
"""Tokens of a scored text fed per step."""


@dataclass(frozen=True)
class Completion:
    """What one ``generate`` call produced, and how long it took."""

    token_ids: list[int]
    """Generated tokens only (no prompt); the end-of-sequence token included."""
    text: str
    """The tokens as text ("" without a tokenizer)."""
    prompt_tokens: int
    seconds_prefill: float
    """From the call to the first token (time to first token)."""
    seconds_decode: float
    """From the first token to the last."""
    finish_reason: str
    """``stop`` (end of sequence or a stop string) or ``length``."""

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, len(self.token_ids) - 1)
        return steps / self.seconds_decode if self.seconds_decode > 0 else 0.0


def generate(
    pipeline: Pipeline,
    prompt: Sequence[int],
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    params: SamplingParams | None = None,
    tokenizer: Tokenizer | None = None,
) -> Completion:
    """Prefill ``prompt`` then decode through the engine; blocks until done.

    Sampling is ``params`` when given, else greedy (``temperature`` 0) or
    sampled from ``max_tokens``, ``temperature``, ``top_p``, ``seed``.
    Generation stops at one of ``eos_ids`` (empty: never early) or, given a
    ``tokenizer`` and no ``eos_ids``, at the tokenizer's end of sequence
    (``params.ignore_eos`` goes on past it); the tokenizer also gives
    ``text`` and stop strings. The prompt is fed in one step, as a served
    request of that length would be. Raises ``ConfigError`` for an empty
    prompt and the engine's errors (``InferenceError``...) if a step fails.
    """
    if not prompt:
        raise ConfigError("the prompt is empty", hint="pass at least one token")
    if params is None:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
    n = len(prompt)
    # Room for the whole request and the prompt in one step; the backends
    # hold the model's own context limit.
    limits = ServingLimits(
        context_length=n + max(1, params.max_tokens),
        max_sequences=1,
        max_queue=0,
        prefill_chunk=n,
        prefill_budget=n,
    )
    stop = eos_ids if eos_ids or tokenizer is None else None
    engine = Engine(pipeline, tokenizer, limits, eos_ids=stop)
    try:
        started = time.perf_counter()
        first = started
        ids: list[int] = []
        text = []
        last: Event | None = None
        for event in engine.submit(list(prompt), params):
            if event.token_id is not None:
                if not ids:
                    first = time.perf_counter()
                ids.append(event.token_id)
            text.append(event.text)
            last = event
        ended = time.perf_counter()
    finally:
        engine.close(pipeline=False)
    assert last is not None  # the engine always ends with a finish event
    if last.error is not None:
        raise last.error
    return Completion(
        ids, "".join(text), n, first - started, ended - first, last.finish_reason or "length"
    )


@dataclass(frozen=True)
class Perplexity:
    """A perplexity figure and how it was taken."""

    value: float
    tokens: int
    """Tokens of the text (the first is never scored: it has no prefix)."""
    scored: int
    """Tokens whose log-likelihood was summed (``tokens - 1``)."""
    window: int
    """Most tokens one sequence held (the model's context, or the whole text)."""
    stride: int
    """Tokens a window advances by (``window`` when the text fits in one)."""


def prompt_logprobs(
    pipeline: Pipeline, token_ids: Sequence[int], *, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """log p(token i | tokens < i) for i >= 1 of ``token_ids`` (float64 ``[n - 1]``),
    scored by the engine as one fresh sequence fed ``chunk`` tokens a step."""
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise ConfigError(f"scoring needs at least two tokens, got {len(ids)}")
    limits = ServingLimits(
        context_length=len(ids),
        max_sequences=1,
        max_queue=0,
        prefill_chunk=chunk,
        prefill_budget=chunk,
    )
    engine = Engine(pipeline, None, limits)
    try:
        events = list(engine.submit(ids, SamplingParams(max_tokens=0), echo=True))
    finally:
        engine.close(pipeline=False)
    last = events[-1]
    if last.error is not None:
        raise last.error
    scores = events[0].prompt_logprobs or ()
    # entry 0 is the first token's (None: it has no prefix)
    return np.asarray([lp for lp, _ in scores[1:]], dtype=np.float64)


def perplexity(
    pipeline: Pipeline,
    token_ids: Sequence[int],
    *,
    window: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> float:
    """exp(mean NLL) of ``token_ids[1:]`` given their prefixes (see ``perplexity_windows``)."""
    return perplexity_windows(pipeline, token_ids, window=window, chunk=chunk).value


def perplexity_windows(
    pipeline: Pipeline,
    token_ids: Sequence[int],
    *,
    window: int | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Perplexity:
    """exp(mean NLL) of every token after the first, each given its prefix.

    A text that fits in ``window`` tokens (None: any length) is scored as one
    sequence. A longer text (a model whose context is shorter than the text)
    is scored in windows of ``window`` tokens advancing by half a window:
    each window is a fresh sequence and scores only the tokens the previous
    one did not, so every token is scored once and, past the first window,
    with at least ``window / 2`` tokens of prefix (the strided method of
    Hugging Face's perplexity guide). Raises ``ConfigError`` for fewer than
    two tokens or a window under two.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    n = int(ids.shape[0])
    if n < 2:
        raise ConfigError(f"perplexity needs at least two tokens, got {n}")
    if window is not None and window < 2:
        raise ConfigError(f"a perplexity window needs at least two tokens, got {window}")
    size = n if window is None or n <= window else window
    stride = size if size == n else max(1, size // 2)
    nll = 0.0
    count = 0
    done = 1  # targets [1, done) are scored; token 0 has no prefix
    begin = 0
    while done < n:
        end = min(begin + size, n)
        logprobs = prompt_logprobs(pipeline, ids[begin:end], chunk=chunk)
        # logprobs[r] is the window's token r + 1; keep the targets not yet scored
        nll -= float(logprobs[done - begin - 1 :].sum())
        count += end - done
        done = end
        begin += stride
    return Perplexity(math.exp(nll / count), n, count, size, stride)
