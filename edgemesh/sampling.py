"""Token sampling, outside the model: greedy, temperature, top-k, top-p, penalties,
logit bias, grammar masks and log-probabilities.

Works on one sequence's logits ``[V]`` (float32). Exact: top-p first looks
at the 1,024 most likely tokens and falls back to a full sort only when
their mass is below ``top_p``, so large vocabularies (262k for Gemma 3)
stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgemesh.errors import RequestError

_CANDIDATES = 1024
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """OpenAI's default for /v1/completions (a chat request's is the serving
    limits' ``default_max_tokens``)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit), OpenAI's ``logit_bias`` (-100..100)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely."""
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            # 0 is only useful with echo: score the prompt, generate nothing.
            raise RequestError("max_tokens must not be negative", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError("temperature must be between 0 and 2", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise RequestError("top_k must be >= 0", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be between -2 and 2", param=name)
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise RequestError("logit_bias values must be between -100 and 100", param="logit_bias")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_penalties(
    logits: np.ndarray, counts: Mapping[int, int], params: SamplingParams
) -> np.ndarray:
    """OpenAI-style penalties on the tokens generated so far (copy on write)."""
    if not counts or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    freq = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.copy()
    out[ids] -= freq * params.frequency_penalty + params.presence_penalty
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from ``logits`` ``[V]``."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float32, copy=False) / np.float32(params.temperature)
    vocab = scaled.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k < vocab or params.top_p < 1.0:
        ids = _top_ids(scaled, min(k, _CANDIDATES) if params.top_p < 1.0 else k)
        probs = _softmax_full_mass(scaled, ids)
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            ids, probs = ids[order], probs[order]
            cum = np.cumsum(probs)
            if cum[-1] < params.top_p and ids.shape[0] < k:
                # The candidates hold too little mass: be exact with a full sort.
                ids = _top_ids(scaled, k)
                probs = _softmax_full_mass(scaled, ids)
                order = np.argsort(-probs, kind="stable")
                ids, probs = ids[order], probs[order]
                cum = np.cumsum(probs)
            keep = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1
            ids, probs = ids[:keep], probs[:keep]
        probs = probs / probs.sum()
        return int(ids[rng.choice(ids.shape[0], p=probs)])
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(vocab, p=probs))


def _top_ids(scaled: np.ndarray, k: int) -> np.ndarray:
    if k >= scaled.shape[0]:
        return np.arange(scaled.shape[0])
    return np.argpartition(scaled, -k)[-k:]


def _softmax_full_mass(scaled: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Probabilities of ``ids`` under the softmax over the whole vocabulary."""
    top = scaled.max()
    z = np.exp(scaled - top).sum()
    return np.exp(scaled[ids] - top) / z


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """``logits`` ``[V]`` plus OpenAI's per-token bias (copy on write); ids past V are ignored."""
    if not bias:
        return logits
    out = logits.copy()
    vocab = out.shape[0]
    for token, value in bias:
        if 0 <= token < vocab:
            out[token] += np.float32(value)
    return out


def apply_mask(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Tokens outside the packed bitmask ``allowed`` (uint32 ``[ceil(V'/32)]``,
    bit i of word w = token 32w+i) get -inf; logits past ``32 * len(allowed)``
    (a model head wider than its tokenizer) are never allowed."""
    if allowed is None:
        return logits
    bits = np.unpackbits(np.ascontiguousarray(allowed).view(np.uint8), bitorder="little")
    vocab = logits.shape[0]
    keep = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.shape[0])
    keep[:n] = bits[:n].astype(bool)
    if not keep.any():
        raise RequestError("the output grammar allows no token here", code="grammar_dead_end")
    return np.where(keep, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


def logprobs_of(
    logits: np.ndarray, token: int, top: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) under softmax(``logits`` ``[V]``) and the ``top`` most likely (id, log p)."""
    x = logits.astype(np.float32, copy=False)
    peak = x.max()
    lse = float(peak + np.log(np.exp(x - peak).sum(dtype=np.float64)))
    chosen = float(x[token]) - lse
    if top <= 0:
        return chosen, ()
    k = min(top, x.shape[0])
    ids = np.argpartition(x, -k)[-k:]
    ids = ids[np.argsort(-x[ids], kind="stable")]
    return chosen, tuple((int(i), float(x[i]) - lse) for i in ids if np.isfinite(x[i]))
