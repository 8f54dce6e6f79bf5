"""Finish a slimmed package: measure it, record what was done, publish it.

Shared by every method so the record is the same everywhere:
``manifest.extra["slim"]`` holds ``method``, ``params``, ``source`` (name
and digest of the package slimmed), ``calibration`` (source, sha256 prefix,
tokens), ``seconds`` and ``quality`` (``measure.Quality`` per precision
measured, plus the source's fp32 ``reference``); ``manifest.accuracy`` of
each measured precision becomes its held-out perplexity increase against
the *source's* fp32, the figure the planner's ``--max-accuracy-loss``
budget reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgemesh.sharding.package.folder import Package, open_package
from edgemesh.sharding.package.manifest import Manifest
from edgemesh.sharding.slim.measure import Quality, measure, relative_loss
from edgemesh.sharding.slim.text import Calibration
from edgemesh.sharding.slim.writer import Draft


@dataclass
class SlimResult:
    package: Path
    method: str
    params: dict[str, Any]
    seconds: float
    reference: Quality
    quality: dict[str, Quality] = field(default_factory=dict)

    def loss(self, precision: str) -> float:
        return relative_loss(self.quality[precision], self.reference)

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": str(self.package),
            "method": self.method,
            "params": self.params,
            "seconds": round(self.seconds, 1),
            "reference": self.reference.to_dict(),
            "quality": {p: q.to_dict() for p, q in self.quality.items()},
            "loss_vs_fp32": {p: self.loss(p) for p in self.quality},
        }


def finish(
    draft: Draft,
    manifest: Manifest,
    source: Package,
    *,
    method: str,
    params: dict[str, Any],
    calibration: Calibration | None,
    precisions: Sequence[str],
    started: float,
    threads: int | None,
    score: bool,
    say: Callable[[str], None],
) -> SlimResult:
    """Measure the draft at ``precisions``, write the record, rename into place."""
    manifest = draft.rehash(manifest)
    manifest.save(draft.root)
    pkg = open_package(draft.root)
    reference = measure(source, "fp32", threads=threads, score=score, say=say)
    quality = {p: measure(pkg, p, threads=threads, score=score, say=say) for p in precisions}
    # the other quantised precisions get their held-out perplexity too: the planner
    # refuses an int8/int4 whose accuracy is unmeasured
    for p in pkg.precisions:
        if p not in quality and p in ("int8", "int4") and manifest.accuracy.get(p) is None:
            quality[p] = measure(pkg, p, threads=threads, score=False, speed=False, say=say)
    accuracy = dict(manifest.accuracy)
    for p, q in quality.items():
        accuracy[p] = relative_loss(q, reference)
    seconds = time.perf_counter() - started
    record = {
        "method": method,
        "params": params,
        "source": {
            "name": source.manifest.name,
            "digest": source.manifest.digest(),
            "path": str(source.root),
        },
        "calibration": calibration.to_dict() if calibration else None,
        "seconds": round(seconds, 1),
        "quality": {
            "heldout": "sharding/convert/data/perplexity.txt from 'On Learning a Craft' on",
            "reference": reference.to_dict(),
            **{p: q.to_dict() for p, q in quality.items()},
        },
    }
    manifest = replace(manifest, accuracy=accuracy, extra={**manifest.extra, "slim": record})
    out = draft.commit(manifest)
    return SlimResult(out, method, params, seconds, reference, quality)
