"""Quality, speed and size of one package at one precision, measured one way for all.

* perplexity on the held-out part of the bundled text (``text.heldout_text``),
  through the package's whole-model graph, as ``convert`` measures accuracy;
* the downstream score of ``harness.downstream_score`` (lm-eval's API);
* decode tokens/s and time to first token for a fixed held-out prompt
  (greedy, ``SPEED_TOKENS`` tokens, end-of-sequence ignored);
* size: bytes of the precision's pieces on disk, and the process's resident
  memory growth from loading the model to the end of the speed run.

Results are cached per package digest and precision under
``edgemesh.paths.slim_dir()`` (``~/.cache/edgemesh/slim/`` by default) so
the fp32 reference of a source package is measured once however many
methods are compared against it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.backends.base import BackendOptions
from edgemesh.sharding.package.folder import Package
from edgemesh.sharding.slim.text import heldout_text

log = logging.getLogger(__name__)

SCHEMA = 1
SPEED_TOKENS = 32
SPEED_PROMPT_TOKENS = 48


@dataclass(frozen=True)
class Quality:
    precision: str
    perplexity: float
    """On the held-out text."""
    heldout_tokens: int
    score: dict[str, Any] | None
    """``harness.Score.to_dict()``; None when not measured."""
    decode_tokens_per_s: float | None
    ttft_s: float | None
    disk_bytes: int
    """Bytes of every piece of the whole model at this precision."""
    ram_bytes: int | None
    """Resident memory growth of this process while the model was loaded and ran."""
    seconds: float
    threads: int | None
    loadavg: float
    """1-minute load average when the measurement finished (the machine is shared)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    return paths.slim_dir()


def disk_bytes(pkg: Package, precision: str) -> int:
    sizes = {a.path: a.bytes for a in pkg.manifest.artifacts}
    return sum(sizes[r] for r in pkg.artifacts_for(0, pkg.num_layers, precision))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def measure(
    pkg: Package,
    precision: str,
    *,
    threads: int | None = None,
    score: bool = True,
    speed: bool = True,
    use_cache: bool = True,
    say: Any = None,
) -> Quality:
    """Measure ``pkg`` at ``precision`` (or return the cached figures for its digest)."""
    key = cache_dir() / f"quality-{pkg.manifest.digest()}-{precision}.json"
    if use_cache and key.is_file():
        try:
            data = json.loads(key.read_text())
            if data.pop("schema", None) == SCHEMA and (data["score"] is not None or not score):
                return Quality(**data)
        except (ValueError, TypeError, KeyError):
            pass
    say = say or (lambda msg: log.info("%s", msg))
    from edgemesh.offline import generate, perplexity
    from edgemesh.sharding.pipeline import load_pipeline
    from edgemesh.sharding.slim.harness import downstream_score

    t0 = time.perf_counter()
    ids = pkg.tokenizer().encode(heldout_text())
    with tempfile.TemporaryDirectory(prefix="edgemesh-slim-measure-") as tmp:
        options = BackendOptions(threads=threads, cache_dir=Path(tmp))
        rss0 = _rss()
        pipe = load_pipeline(pkg, [], precision, options=options)
        try:
            # a model whose context is shorter than the text is scored in strided windows
            ppl = perplexity(pipe, ids, window=pkg.manifest.context_length)
            name = pkg.manifest.name
            say(f"{name} {precision}: held-out perplexity {ppl:.3f} ({len(ids)} tokens)")
            tps = ttft = None
            if speed:
                gen = generate(pipe, ids[:SPEED_PROMPT_TOKENS], max_tokens=SPEED_TOKENS)
                tps, ttft = gen.decode_tokens_per_s, gen.seconds_prefill
            ram = _rss() - rss0
        finally:
            pipe.close()
        result = None
        if score:
            result = downstream_score(pkg, precision, options).to_dict()
            say(f"{pkg.manifest.name} {precision}: next-sentence acc {result['acc']:.3f}")
    quality = Quality(
        precision=precision,
        perplexity=round(ppl, 4),
        heldout_tokens=len(ids),
        score=result,
        decode_tokens_per_s=None if tps is None else round(tps, 2),
        ttft_s=None if ttft is None else round(ttft, 4),
        disk_bytes=disk_bytes(pkg, precision),
        ram_bytes=ram,
        seconds=round(time.perf_counter() - t0, 1),
        threads=threads,
        loadavg=round(os.getloadavg()[0], 2),
    )
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps({"schema": SCHEMA, **quality.to_dict()}, indent=1))
    return quality


def relative_loss(quality: Quality, reference: Quality) -> float:
    """Perplexity increase against the reference (the source's fp32), e.g. 0.05 = +5%."""
    return round(quality.perplexity / reference.perplexity - 1.0, 6)
