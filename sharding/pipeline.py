"""Open a package as a ``LocalPipeline`` over chosen cuts: no mesh, one process.

``load_pipeline(package, cuts=[6, 12])`` opens one shard backend per range
(``[0,6) [6,12) [12,L)``) and chains them in an ``edgemesh.pipeline.LocalPipeline``.
``edgemesh serve PACKAGE`` serves it; ``edgemesh generate``, the converter's
perplexity and the tests run one request over it through the engine
(``edgemesh.offline``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec
from edgemesh.errors import ConfigError
from edgemesh.pipeline import LocalPipeline
from edgemesh.sharding.package.folder import Package, open_package

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
