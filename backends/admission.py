"""The one admission check of a forward call, shared by every backend that
keeps sequences (the ONNX range runtime in ``batching``, RKNN's static
graphs, llama.cpp's KV streams).

A call is refused here, before anything changes, or not at all: a refused
call takes no sequence slot, rewinds no cache and runs nothing. Each
backend used to check on its own and two checked the position gap after
taking a slot, so a refused call kept its slot until the caller released
a sequence it never got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edgemesh.backends.base import LayerRange, SeqInput
from edgemesh.errors import ContextOverflowError, InferenceError


@dataclass(frozen=True)
class RangeInputs:
    """What one loaded layer range accepts."""

    layers: LayerRange
    first: bool
    """Starts the model: takes token ids (else hidden states)."""
    hidden_size: int
    """Width of the hidden states a later range takes."""
    context_length: int
    """Positions one sequence may reach."""
    max_sequences: int
    """Sequences held at once (each one slot)."""
    pools: bool = False
    """Runs ``logits="pooled"`` passes (stateless: no slot, start at 0)."""


def admit(
    batch: Sequence[SeqInput],
    accepts: RangeInputs,
    cached: Callable[[int], int | None],
    live: int,
) -> None:
    """Raise unless every item of ``batch`` can run: distinct sequences, at least
    one new token each, the right input kind and shape, within the context, no
    position gap (``start_pos`` at most the tokens ``cached(seq_id)`` reports;
    None = a sequence not held yet, which starts at 0) and a slot for every new
    sequence (``live`` are held). A ``start_pos`` below the cached length is a
    replay, allowed: the backend drops the tail.

    Raises ``ContextOverflowError`` past the context, else ``InferenceError``.
    Changes nothing: the backend takes slots only after this returns.
    """
    layers = accepts.layers
    seen: set[int] = set()
    new = 0
    for item in batch:
        if item.seq_id in seen:
            raise InferenceError(f"sequence {item.seq_id} appears twice in one call")
        seen.add(item.seq_id)
        n = item.length
        if n < 1:
            raise InferenceError("a forward call needs at least one new token")
        if item.start_pos + n > accepts.context_length:
            raise ContextOverflowError(
                f"sequence {item.seq_id} would reach {item.start_pos + n} tokens; the "
                f"context is {accepts.context_length}"
            )
        if accepts.first and item.tokens is None:
            raise InferenceError(f"layers {layers} start the model: send token ids")
        if not accepts.first:
            if item.hidden is None:
                raise InferenceError(f"layers {layers} take hidden states, not tokens")
            if item.hidden.shape != (n, accepts.hidden_size):
                raise InferenceError(
                    f"hidden states of shape {item.hidden.shape}; layers {layers} "
                    f"take [{n}, {accepts.hidden_size}]"
                )
        if item.logits == "pooled":
            if not accepts.pools:
                raise InferenceError(f"layers {layers} on this backend run no pooled pass")
            if item.start_pos:
                raise InferenceError(f"a pooled pass starts at position 0, not {item.start_pos}")
            continue  # stateless: no cache to check, no slot taken
        have = cached(item.seq_id)
        if item.start_pos > (have or 0):
            raise InferenceError(
                f"sequence {item.seq_id} starts at position {item.start_pos} but only "
                f"{have or 0} tokens are cached on layers {layers}"
            )
        new += have is None
    if live + new > accepts.max_sequences:
        raise InferenceError(
            f"all {accepts.max_sequences} sequence slots are busy",
            hint="release finished sequences or raise max_sequences",
        )
