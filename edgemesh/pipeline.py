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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgemesh.backends.base import Backend, SeqInput
from edgemesh.errors import ConfigError
from edgemesh.sampling import SamplingParams, apply_penalties, sample


@dataclass(frozen=True)
class Pick:
    """How to choose one sequence's next token from its logits."""

    params: SamplingParams
    seed: int
    step: int
    """Tokens generated so far; with ``seed`` it fixes the random stream."""
    counts: dict[int, int] = field(default_factory=dict)
    """Generated-token counts, sent only when penalties are on."""

    def choose(self, logits: np.ndarray) -> int:
        # logits: [V] float32
        rng = np.random.default_rng([self.seed, self.step])
        return sample(apply_penalties(logits, self.counts, self.params), self.params, rng)


def apply_picks(logits: Sequence[np.ndarray], picks: Sequence[Pick | None]) -> list[int | None]:
    """Sample the last row of each sequence's logits (``[n, V]``) where asked."""
    return [None if p is None else p.choose(lg[-1]) for lg, p in zip(logits, picks, strict=True)]


class Pipeline(Protocol):
    depth: int
    """Micro-batches that can be in flight at once (number of stages)."""

    def submit(
        self, inputs: Sequence[SeqInput], picks: Sequence[Pick | None]
    ) -> cf.Future[list[int | None]]:
        """Run one micro-batch through every stage; the future holds the picks."""
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

    def forward(self, inputs: Sequence[SeqInput]) -> list[np.ndarray]:
        """Tokens in, logits out (``[1, V]`` or ``[S, V]`` per sequence)."""
        with self._lock:
            outputs = self.backends[0].forward(inputs)
            for backend in self.backends[1:]:
                inputs = [
                    SeqInput(i.seq_id, i.start_pos, hidden=h, logits=i.logits)
                    for i, h in zip(inputs, outputs, strict=True)
                ]
                outputs = backend.forward(inputs)
            return outputs

    def submit(
        self, inputs: Sequence[SeqInput], picks: Sequence[Pick | None]
    ) -> cf.Future[list[int | None]]:
        future: cf.Future[list[int | None]] = cf.Future()
        try:
            future.set_result(apply_picks(self.forward(inputs), picks))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def release(self, seq_id: int) -> None:
        for backend in self.backends:
            backend.release(seq_id)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
