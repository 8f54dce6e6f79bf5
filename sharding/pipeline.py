"""Run a package locally through chosen cuts: no mesh, one process.

``load_pipeline(package, cuts=[6, 12])`` opens one shard backend per range
(``[0,6) [6,12) [12,L)``), chains them in an ``edgemesh.pipeline.LocalPipeline``,
and ``generate`` decodes greedily (temperature 0) or by sampling. This is
what ``edgemesh generate`` runs, what the tests compare with transformers,
and what ``convert`` uses to measure perplexity.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.errors import ConfigError
from edgemesh.pipeline import LocalPipeline, Pick
from edgemesh.sampling import SamplingParams
from edgemesh.sharding.package.folder import Package, open_package

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "onnxruntime"


def ranges_from_cuts(cuts: Sequence[int], num_layers: int) -> list[LayerRange]:
    """``[6, 12]`` on 18 layers -> ``[0,6) [6,12) [12,18)``; cuts must increase strictly."""
    points = [0, *sorted(set(int(c) for c in cuts)), num_layers]
    if list(cuts) != sorted(set(cuts)) or points[1] <= 0 or points[-2] >= num_layers:
        raise ConfigError(
            f"cuts {list(cuts)} must increase strictly and lie inside 1..{num_layers - 1}"
        )
    return [LayerRange(a, b) for a, b in itertools.pairwise(points)]


def parse_cuts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError as exc:
        raise ConfigError(f"--cuts takes layer numbers like 6,12, got '{text}'") from exc


def load_pipeline(
    package: Package | Path | str,
    cuts: Sequence[int] = (),
    precision: str | Sequence[str] = "fp32",
    *,
    backend: str = DEFAULT_BACKEND,
    options: BackendOptions | None = None,
) -> LocalPipeline:
    """One backend per range, chained. ``precision`` is one name or one per range."""
    from edgemesh.backends import registry

    pkg = package if isinstance(package, Package) else open_package(package)
    ranges = ranges_from_cuts(cuts, pkg.num_layers)
    precisions = [precision] * len(ranges) if isinstance(precision, str) else list(precision)
    if len(precisions) != len(ranges):
        raise ConfigError(f"{len(ranges)} ranges but {len(precisions)} precisions given")
    cls = registry.require_available(backend)
    if not cls.capabilities.partial_ranges and len(ranges) > 1:
        raise ConfigError(f"backend '{backend}' runs whole models only; drop --cuts")
    stages = []
    try:
        for rng, prec in zip(ranges, precisions, strict=True):
            spec = ShardSpec(pkg.root, rng, pkg.num_layers, prec)
            stages.append(cls(spec, options or BackendOptions()))
    except Exception:
        for stage in stages:
            stage.close()
        raise
    return LocalPipeline(stages)


@dataclass
class Generation:
    token_ids: list[int]
    """Generated tokens only (no prompt)."""
    prompt_tokens: int
    seconds_prefill: float
    seconds_decode: float
    finish_reason: str
    timings: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, len(self.token_ids) - 1)
        return steps / self.seconds_decode if self.seconds_decode > 0 else 0.0


def generate(
    pipeline: LocalPipeline,
    prompt: Sequence[int],
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] = (),
    seq_id: int = 0,
) -> Generation:
    """Prefill ``prompt`` then decode up to ``max_tokens`` tokens (stops at an EOS id)."""
    if not prompt:
        raise ConfigError("the prompt is empty")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    eos = set(eos_ids)
    out: list[int] = []
    tokens = np.asarray(prompt, dtype=np.int64)
    pos = 0
    finish = "length"
    t0 = time.perf_counter()
    t_first = t0
    try:
        while len(out) < max_tokens:
            logits = pipeline.forward([SeqInput(seq_id, pos, tokens=tokens)])[0]  # [1, V]
            token = Pick(params, seed, len(out)).choose(logits[-1])
            if not out:
                t_first = time.perf_counter()
            pos += int(tokens.shape[0])
            out.append(token)
            if token in eos:
                finish = "stop"
                break
            tokens = np.array([token], dtype=np.int64)
    finally:
        pipeline.release(seq_id)
    t_end = time.perf_counter()
    return Generation(out, len(prompt), t_first - t0, t_end - t_first, finish)


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


def perplexity(
    pipeline: LocalPipeline,
    token_ids: Sequence[int],
    *,
    window: int | None = None,
    chunk: int = 256,
    seq_id: int = 1,
) -> float:
    """exp(mean NLL) of ``token_ids[1:]`` given their prefixes (see ``perplexity_windows``)."""
    return perplexity_windows(pipeline, token_ids, window=window, chunk=chunk, seq_id=seq_id).value


def perplexity_windows(
    pipeline: LocalPipeline,
    token_ids: Sequence[int],
    *,
    window: int | None = None,
    chunk: int = 256,
    seq_id: int = 1,
) -> Perplexity:
    """exp(mean NLL) of every token after the first, each given its prefix.

    A text that fits in ``window`` tokens (None: any length) runs as one
    sequence, fed ``chunk`` tokens at a time with logits for every row, so
    the KV cache carries the whole prefix and memory stays ``chunk x V``.
    A longer text (a model whose context is shorter than the text) is
    scored in windows of ``window`` tokens advancing by half a window: each
    window is a fresh sequence and scores only the tokens the previous one
    did not, so every token is scored once and, past the first window, with
    at least ``window / 2`` tokens of prefix (the strided method of
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
        nll += _window_nll(pipeline, ids[begin:end], done - begin, chunk, seq_id)
        count += end - done
        done = end
        begin += stride
    return Perplexity(math.exp(nll / count), n, count, size, stride)


def _window_nll(
    pipeline: LocalPipeline, ids: np.ndarray, first_target: int, chunk: int, seq_id: int
) -> float:
    """Summed NLL of ``ids[first_target:]``, the window fed as one fresh sequence."""
    nll = 0.0
    try:
        for begin in range(0, ids.shape[0] - 1, chunk):
            piece = ids[begin : min(begin + chunk, ids.shape[0] - 1)]
            # row r predicts ids[begin + r + 1]; keep the rows whose target is scored
            keep = max(0, first_target - begin - 1)
            if keep >= piece.shape[0]:  # prefix only: fill the KV cache, skip the head's rows
                pipeline.forward([SeqInput(seq_id, begin, tokens=piece, logits="last")])
                continue
            logits = pipeline.forward([SeqInput(seq_id, begin, tokens=piece, logits="all")])[0]
            rows = logits[keep:]  # [n, V] float32
            targets = ids[begin + 1 + keep : begin + 1 + piece.shape[0]]
            # log-sum-exp accumulated in float64
            top = rows.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(rows - top).sum(axis=-1, dtype=np.float64)) + top[:, 0]
            picked = rows[np.arange(targets.shape[0]), targets].astype(np.float64)
            nll += float((logz - picked).sum())
    finally:
        pipeline.release(seq_id)
    return nll
