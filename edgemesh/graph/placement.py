"""Which boxes hold a replica of a graph model: pure, from each box's own timing.

Every box that loads a graph package times it on its chosen engine and
precision (``GraphService.measured_p50_ms``, batch 1, after warm-up) and
reports it in ``/v2/models/{m}/stats``. ``choose_replicas`` keeps the boxes
that serve it best:

* ``replicas=None`` ("auto"): every box within ``slack`` x the fastest box's
  p50, or within ``AUTO_MARGIN_MS`` of it (sub-millisecond models: timing
  noise, not hardware); a box 3x slower would only add tail latency to the
  requests it gets;
* ``replicas=N``: the N fastest.

Boxes that could not time it (``None``) come last, in the given order.
Ties keep the given order (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgemesh.errors import PlanError

AUTO_SLACK = 2.0
AUTO_MARGIN_MS = 1.0


@dataclass(frozen=True)
class Candidate:
    box: str
    p50_ms: float | None


def choose_replicas(
    candidates: list[Candidate], replicas: int | None = None, slack: float = AUTO_SLACK
) -> list[Candidate]:
    if not candidates:
        raise PlanError("no box can serve this graph model")
    if replicas is not None and replicas < 1:
        raise PlanError(f"replicas must be >= 1 or auto, got {replicas}")
    timed = sorted((c for c in candidates if c.p50_ms is not None), key=lambda c: c.p50_ms or 0.0)
    untimed = [c for c in candidates if c.p50_ms is None]
    ranked = timed + untimed
    if replicas is not None:
        if replicas > len(ranked):
            raise PlanError(
                f"{replicas} replicas asked for but only {len(ranked)} boxes can serve the model"
            )
        return ranked[:replicas]
    if not timed:
        return ranked
    best = timed[0].p50_ms or 0.0
    limit = max(best * slack, best + AUTO_MARGIN_MS)
    return [c for c in timed if (c.p50_ms or 0.0) <= limit]
