"""What the engine drives: a pipeline of shards that turns tokens into next tokens.

The engine hands a pipeline one micro-batch at a time: each sequence's new
tokens (``SeqInput``) and, for sequences that need a next token, a ``Pick``
saying how to choose it. The pipeline runs its shards and applies the picks
where the logits are — on the last shard — so only token ids travel back,
not ``[V]`` logits. Picks are stateless (the RNG is derived from the seed
and the step), so a sequence replayed on another box samples the same.

``LocalPipeline`` chains backends in this process: the single-box path.
The mesh router implements the same protocol over Ray.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgemesh.backends.base import Backend, SeqInput
from edgemesh.errors import ConfigError
from edgemesh.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_mask,
    apply_penalties,
    logprobs_of,
    sample,
)


@dataclass(frozen=True)
class Picked:
    """What the last shard sends back for one sequence: the chosen token and,
    when asked, log-probabilities (plain data: it crosses Ray)."""

    token: int | None
    """None for a score-only pick (a prompt chunk scored for ``echo``)."""
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (token id, logprob) at this step, best first."""
    scored: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()
    """Per scored prompt token: (its logprob, the top (id, logprob) at its position)."""


@dataclass(frozen=True)
class Pick:
    """How to choose one sequence's next token from its logits.

    Stateless: everything the choice depends on travels in the pick (the RNG
    from ``seed`` and ``step``, the grammar's mask as bits), so a micro-batch
    replayed on another box picks the same."""

    params: SamplingParams
    seed: int
    step: int
    """Tokens generated so far; with ``seed`` it fixes the random stream."""
    counts: dict[int, int] = field(default_factory=dict)
    """Generated-token counts, sent only when penalties are on."""
    allowed: np.ndarray | None = None
    """The output grammar's packed bitmask (uint32 ``[ceil(V/32)]``); None = any token."""
    score: np.ndarray | None = None
    """int64 ``[n]``: prompt tokens to score, row i of the logits predicting ``score[i]``
    (needs ``SeqInput.logits == "all"``): ``echo`` with logprobs."""
    sample: bool = True
    """False: score only (a prompt chunk before the last)."""

    def processed(self, logits: np.ndarray) -> np.ndarray:
        """The logits ``[V]`` sampling sees: penalties, logit bias, grammar mask."""
        out = apply_penalties(logits, self.counts, self.params)
        out = apply_logit_bias(out, self.params.logit_bias)
        return apply_mask(out, self.allowed)

    def choose(self, logits: np.ndarray) -> int:
        # logits: [V] float32
        rng = np.random.default_rng([self.seed, self.step])
        return sample(self.processed(logits), self.params, rng)

    def apply(self, rows: np.ndarray) -> Picked:
        """Score and/or choose from one sequence's logits ``[n, V]``."""
        top = self.params.logprobs or 0
        scored: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] = ()
        if self.score is not None:
            scored = tuple(logprobs_of(rows[i], int(t), top) for i, t in enumerate(self.score))
        if not self.sample:
            return Picked(None, scored=scored)
        logits = self.processed(rows[-1])
        rng = np.random.default_rng([self.seed, self.step])
        token = sample(logits, self.params, rng)
        if self.params.logprobs is None:
            return Picked(token, scored=scored)
        logprob, best = logprobs_of(logits, token, top)
        return Picked(token, logprob, best, scored)


def apply_picks(logits: Sequence[np.ndarray], picks: Sequence[Pick | None]) -> list[Picked | None]:
    """Apply each sequence's pick to its logits (``[n, V]``) where asked."""
    return [None if p is None else p.apply(lg) for lg, p in zip(logits, picks, strict=True)]


class Pipeline(Protocol):
    depth: int
    """Micro-batches that can be in flight at once (number of stages)."""

    def submit(
        self, inputs: Sequence[SeqInput], picks: Sequence[Pick | None]
    ) -> cf.Future[list[Picked | None]]:
        """Run one micro-batch through every stage; the future holds the picks' results."""
        ...

    def release(self, seq_id: int) -> None: ...

    def close(self) -> None: ...


class LocalPipeline:
    """Backends chained in process, e.g. one whole-model llama.cpp backend or
    several ONNX layer ranges. Runs on the caller's thread (depth 1)."""

    depth = 1

    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ConfigError("a pipeline needs at least one backend")
        for prev, nxt in itertools.pairwise(backends):
            if prev.shard.layers.stop != nxt.shard.layers.start:
                raise ConfigError(
                    f"shards {prev.shard.layers} and {nxt.shard.layers} are not contiguous"
                )
        if not backends[0].shard.is_first or not backends[-1].shard.is_last:
            raise ConfigError("the shards must cover the model from the first layer to the last")
        self.backends = list(backends)
        self._lock = threading.Lock()
        self._calls = [0] * len(self.backends)
        self._busy_s = [0.0] * len(self.backends)

    def forward(self, inputs: Sequence[SeqInput]) -> list[np.ndarray]:
        """Tokens in, logits out (``[1, V]`` or ``[S, V]`` per sequence)."""
        with self._lock:
            outputs: list[np.ndarray] = []
            for k, backend in enumerate(self.backends):
                if k:
                    inputs = [
                        SeqInput(i.seq_id, i.start_pos, hidden=h, logits=i.logits)
                        for i, h in zip(inputs, outputs, strict=True)
                    ]
                started = time.perf_counter()
                outputs = backend.forward(inputs)
                self._busy_s[k] += time.perf_counter() - started
                self._calls[k] += 1
            return outputs

    def stage_timings(self) -> list[dict[str, object]]:
        """Per stage: forward calls and seconds spent in them (for /metrics)."""
        return [
            {"stage": k, "box": "local", "calls": self._calls[k], "busy_s": self._busy_s[k]}
            for k in range(len(self.backends))
        ]

    def submit(
        self, inputs: Sequence[SeqInput], picks: Sequence[Pick | None]
    ) -> cf.Future[list[Picked | None]]:
        future: cf.Future[list[Picked | None]] = cf.Future()
        try:
            future.set_result(apply_picks(self.forward(inputs), picks))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def release(self, seq_id: int) -> None:
        for backend in self.backends:
            backend.release(seq_id)

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        """Copy a sequence's KV cache on every shard; all or nothing."""
        with self._lock:
            done = []
            for backend in self.backends:
                if not backend.fork(src_seq_id, dst_seq_id):
                    for b in done:
                        b.release(dst_seq_id)
                    return False
                done.append(backend)
            return True

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
