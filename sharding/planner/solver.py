"""Dynamic programs that place contiguous layer ranges on an ordered chain of boxes.

Both take the same inputs: ``score[b, c, j, k]``, the score of a stage on
box ``b`` covering layers ``[j, k)`` whose hidden state goes on to box
``c`` (its outgoing link is part of the score), and ``last[b, j]``, the
score of ``[j, L)`` on ``b`` as the final stage. Infeasible stages score inf.
``combine`` is ``"max"`` (the bottleneck) or ``"sum"`` (single-stream
latency, or any additive score). Each box runs at most one stage.

* ``solve_exact`` searches every subset and every order of the boxes
  (Held-Karp style: the state is the first layer still to place, the box
  that takes it, and the set of boxes still free), so it equals an
  exhaustive search. Cost: n·2^(n-1) states × n matrix operations on
  (L+1)² arrays; fine up to ``EXACT_MAX_BOXES``.
* ``solve_ordered`` keeps a given order and picks a subsequence of it
  (O(n²) matrix operations), for larger meshes.

Ties go to the candidate found first: ending the chain before adding a
box, then lower box indices, then the smaller ``k`` (``argmin``), so the
result is a function of the inputs alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EXACT_MAX_BOXES = 10
INF = float("inf")


@dataclass(frozen=True)
class Chain:
    """A solved chain: ``value`` and stages ``(box, start, stop, next box or -1)``."""

    value: float
    stages: tuple[tuple[int, int, int, int], ...]


# np.maximum or np.add: how a stage's cost combines with the rest of the chain.
_Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _op(combine: str) -> _Combine:
    if combine == "max":
        return np.maximum
    if combine == "sum":
        return np.add
    raise ValueError(f"combine must be 'max' or 'sum', got {combine!r}")


def _extend(
    best: np.ndarray,
    best_k: np.ndarray,
    best_c: np.ndarray,
    stage: np.ndarray,
    rest: np.ndarray,
    c: int,
    op: _Combine,
) -> None:
    """Fold 'stage [j, k) then the best chain from k starting on c' into best (in place)."""
    vals = op(stage, rest[None, :])  # [L+1 (j), L+1 (k)]
    k = vals.argmin(axis=1)
    v = vals[np.arange(vals.shape[0]), k]
    better = v < best
    best[better] = v[better]
    best_k[better] = k[better]
    best_c[better] = c


def solve_exact(score: np.ndarray, last: np.ndarray, combine: str) -> Chain | None:
    """Best chain over all subsets and orders of the boxes; None if none is finite."""
    n, width = last.shape
    op = _op(combine)
    full = (1 << n) - 1
    g = np.full((full + 1, n, width), INF)
    nxt_k = np.zeros((full + 1, n, width), dtype=np.int32)
    nxt_c = np.full((full + 1, n, width), -1, dtype=np.int32)
    for free in range(full + 1):  # subsets before supersets: free ^ bit < free
        members = [c for c in range(n) if free >> c & 1]
        for b in range(n):
            if free >> b & 1:
                continue
            best = last[b].copy()
            best_k = np.full(width, width - 1, dtype=np.int32)
            best_c = np.full(width, -1, dtype=np.int32)
            for c in members:
                _extend(best, best_k, best_c, score[b, c], g[free ^ (1 << c), c], c, op)
            g[free, b], nxt_k[free, b], nxt_c[free, b] = best, best_k, best_c
    starts = [g[full ^ (1 << b), b, 0] for b in range(n)]
    b = int(np.argmin(starts))
    if not np.isfinite(starts[b]):
        return None
    stages = []
    free, j = full ^ (1 << b), 0
    while True:
        k, c = int(nxt_k[free, b, j]), int(nxt_c[free, b, j])
        stages.append((b, j, k, c))
        if c < 0:
            break
        free, b, j = free ^ (1 << c), c, k
    return Chain(float(g[full ^ (1 << stages[0][0]), stages[0][0], 0]), tuple(stages))


def solve_ordered(
    score: np.ndarray, last: np.ndarray, combine: str, order: list[int]
) -> Chain | None:
    """Best chain whose boxes appear in ``order`` (any subsequence of it)."""
    n, width = last.shape
    op = _op(combine)
    g = np.full((n, width), INF)
    nxt_k = np.zeros((n, width), dtype=np.int32)
    nxt_c = np.full((n, width), -1, dtype=np.int32)
    for pos in range(len(order) - 1, -1, -1):
        b = order[pos]
        best = last[b].copy()
        best_k = np.full(width, width - 1, dtype=np.int32)
        best_c = np.full(width, -1, dtype=np.int32)
        for c in order[pos + 1 :]:
            _extend(best, best_k, best_c, score[b, c], g[c], c, op)
        g[b], nxt_k[b], nxt_c[b] = best, best_k, best_c
    starts = [g[b, 0] for b in order]
    pos = int(np.argmin(starts))
    if not np.isfinite(starts[pos]):
        return None
    b, j, stages = order[pos], 0, []
    while True:
        k, c = int(nxt_k[b, j]), int(nxt_c[b, j])
        stages.append((b, j, k, c))
        if c < 0:
            break
        b, j = c, k
    return Chain(float(starts[pos]), tuple(stages))


def solve(
    score: np.ndarray, last: np.ndarray, combine: str, order: list[int]
) -> tuple[Chain | None, str]:
    """Exact search up to ``EXACT_MAX_BOXES`` boxes, else the ordered one.

    Returns the chain (None if nothing fits) and ``"exact"`` or ``"ordered"``.
    """
    if last.shape[0] <= EXACT_MAX_BOXES:
        return solve_exact(score, last, combine), "exact"
    return solve_ordered(score, last, combine, order), "ordered"
