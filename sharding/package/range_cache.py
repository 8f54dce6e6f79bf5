"""The composed-range cache's size bound: least recently used entries go first.

Every re-plan can cut new ranges, and each composed range is a copy of its
layers' weights, so without a bound the cache would grow until an edge box's
SD card is full. ``Package.range_graph`` marks an entry used on every hit
(its folder's mtime) and, after composing a new one, removes the least
recently used others until the cache is within ``RANGE_CACHE_BYTES``. The
entry just made is never removed, even when it alone is over the bound.
A backend that already loaded a removed range keeps running: the runtimes
read or map the files at load, and an unlinked file stays readable to them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

RANGE_CACHE_BYTES = 8 * 10**9
"""Twice the default model's whole package at every precision (3.6 GB), and
room for two or three int4 ranges of a 7B model."""


def mark_used(entry: Path) -> None:
    """Record a cache hit, so the entry counts as recently used."""
    try:
        os.utime(entry)
    except OSError:  # read-only cache or a racing prune: the hit still stands
        pass


def _bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def prune(cache: Path, keep: Path, limit_bytes: int = RANGE_CACHE_BYTES) -> list[Path]:
    """Remove least recently used entries of ``cache`` (not ``keep``, not
    temporary ``.compose-*`` folders) until it holds at most ``limit_bytes``.
    Returns what was removed."""
    entries = [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".")]
    sizes = {d: _bytes(d) for d in entries}
    total = sum(sizes.values())
    removed = []
    for entry in sorted(entries, key=lambda d: (d.stat().st_mtime, d.name)):
        if total <= limit_bytes:
            break
        if entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry)
    if removed:
        log.info(
            "range cache %s: removed %d least recently used entries, %.2f GB left",
            cache,
            len(removed),
            total / 1e9,
        )
    return removed
