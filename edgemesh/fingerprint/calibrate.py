"""``edgemesh info --measure --calibrate PKG``: time the real model on this box.

For each installed backend that runs partial layer ranges of an ONNX
package, and each precision the package has within the accuracy budget,
four layer ranges are timed, each as the median of three windows' mean
decode step (each window at least ``MIN_SECONDS``), with ``position`` tokens
cached at the start:

* ``[1, 2)``            one layer:                 overhead + layer
* ``[1, 1 + n)``        ``n`` layers:              overhead + n * layer
* ``[0, 1)``            the first layer:           overhead + layer + embedding
* ``[L - 1, L)``        the last layer:            overhead + layer + head

which give ``layer_ms``, ``overhead_ms``, ``embed_ms`` and ``head_ms``
(``edgemesh.sharding.planner.calibration``). A window's mean, never the median of
its steps, because under a CPU quota a step either runs at full speed or
waits out the throttled rest of a 100 ms CFS period: the median of such
steps is the unthrottled speed, the mean is what a pipeline gets. ``n`` is
as many layers as fit in an eighth of the memory limit (at least 2), so the
timed weights stream from memory much as a whole stage's do.

The composed range graphs go to a temporary folder that is removed
afterwards. Results are cached like ``measure``'s, in a file named by the
hardware key, the package's digest, the position and the thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgemesh.backends.base import Backend, SeqInput
from edgemesh.errors import BackendError, ConfigError, EdgemeshError, FingerprintError
from edgemesh.sharding.package.folder import Package
from edgemesh.sharding.package.manifest import Manifest
from edgemesh.sharding.planner.calibration import Calibration, StageTiming

log = logging.getLogger(__name__)

SCHEMA = 3  # bump when what is timed changes, so old caches are ignored
POSITION = 128
MIN_SECONDS = 1.0
"""Per window: ten CFS periods, so a quota's throttling shows in the mean."""
WINDOWS = 3
"""Windows per range; their median is taken. One-second windows of the same
16 OpenVINO layers under a 0.5-CPU quota ranged from 46 to 59 ms here."""
MIN_STEPS = 8
MAX_STEPS = 256
"""Caps the cache's growth: past ``position + WARMUP_STEPS + MAX_STEPS`` the
sequence is refilled to ``position`` (untimed)."""
WARMUP_STEPS = 3
MAX_ACCURACY_LOSS = 0.10  # the planner's default budget (PlanOptions)


def decode_step_ms(
    backend: Backend,
    manifest: Manifest,
    first: bool,
    position: int,
    context: int,
    min_seconds: float = MIN_SECONDS,
    windows: int = WINDOWS,
) -> float:
    """Median over ``windows`` of the mean ms of one sequence's decode step,
    ``position`` to ``position + MAX_STEPS`` tokens cached. Each window times
    steps until ``min_seconds`` (and ``MIN_STEPS``) of them have passed."""
    rng = np.random.default_rng(0)
    vocab, hidden = manifest.vocab_size, manifest.hidden_size
    forward = backend.forward
    limit = min(context - 1, position + WARMUP_STEPS + MAX_STEPS)
    if limit <= position + WARMUP_STEPS:
        raise ConfigError(
            f"a context of {context} tokens leaves no room to time decode steps "
            f"after {position} cached tokens",
            hint="time at a smaller position",
        )

    def item(pos: int, n: int) -> SeqInput:
        if first:
            return SeqInput(0, pos, tokens=rng.integers(0, vocab, size=n, dtype=np.int64))
        return SeqInput(0, pos, hidden=rng.standard_normal((n, hidden), dtype=np.float32))

    def refill() -> int:
        forward([item(0, position)])  # from 0 again: the backend drops the longer cache
        for pos in range(position, position + WARMUP_STEPS):
            forward([item(pos, 1)])
        return position + WARMUP_STEPS

    pos = refill()
    means = []
    for _ in range(windows):
        spent, steps = 0.0, 0
        while steps < MIN_STEPS or spent < min_seconds:
            if pos >= limit:
                pos = refill()
            begin = time.perf_counter()
            forward([item(pos, 1)])
            spent += time.perf_counter() - begin
            pos, steps = pos + 1, steps + 1
        means.append(1000 * spent / steps)
    return float(statistics.median(means))


@dataclass(frozen=True)
class _Setup:
    """What every timed range of one calibration shares."""

    package: Package
    threads: int
    position: int
    window_s: float
    cache: Path
    """Where the composed range graphs go (a temporary folder)."""


def _time_range(cls: type[Backend], setup: _Setup, start: int, stop: int, precision: str) -> float:
    from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec

    package, position = setup.package, setup.position
    context = min(package.manifest.context_length, position + WARMUP_STEPS + MAX_STEPS + 1)
    spec = ShardSpec(package.root, LayerRange(start, stop), package.num_layers, precision)
    options = BackendOptions(threads=setup.threads, cache_dir=setup.cache,
                             context_length=context, max_sequences=1)  # fmt: skip
    with cls(spec, options) as backend:
        first = start == 0
        return decode_step_ms(backend, package.manifest, first, position, context, setup.window_s)


def block_layers(num_layers: int, layer_bytes: int, memory_limit_bytes: int) -> int:
    """How many layers the ``[1, 1 + n)`` timing runs: what fits in an eighth
    of the memory limit, at least 2, and leaving layer 0 and the last out."""
    fit = memory_limit_bytes // 8 // max(1, layer_bytes)
    return int(max(2, min(num_layers - 2, fit)))


def time_option(cls: type[Backend], setup: _Setup, precision: str, block: int) -> StageTiming:
    """The four timings of one (backend, precision), decomposed."""
    last = setup.package.num_layers
    single = _time_range(cls, setup, 1, 2, precision)
    many = _time_range(cls, setup, 1, 1 + block, precision)
    first = _time_range(cls, setup, 0, 1, precision)
    final = _time_range(cls, setup, last - 1, last, precision)
    layer = (many - single) / (block - 1)
    if layer <= 0:  # noise larger than a layer: no fixed cost can be told apart
        layer, overhead = many / block, 0.0
    else:
        overhead = max(0.0, single - layer)
    return StageTiming(
        layer_ms=layer,
        overhead_ms=overhead,
        embed_ms=max(0.0, first - single),
        head_ms=max(0.0, final - single),
    )


def candidates(
    installed: list[str], precisions: list[str], manifest: Manifest
) -> list[tuple[type[Backend], str]]:
    """(backend class, precision) pairs worth timing, best backend first."""
    from edgemesh.backends import registry
    from edgemesh.sharding.planner.costs import precision_refusal

    out = []
    for name in installed:
        try:
            cls = registry.get(name)
        except EdgemeshError:
            continue
        caps = cls.capabilities
        if cls.available() or not caps.partial_ranges or caps.artifact_format != "onnx":
            continue
        for p in precisions:
            if p in caps.precisions and precision_refusal(manifest, p, MAX_ACCURACY_LOSS) is None:
                out.append((cls, p))
    return out


def run_calibration(
    package_dir: Path, installed: list[str], threads: int, memory_limit_bytes: int,
    position: int = POSITION, window_s: float = MIN_SECONDS,
) -> Calibration:  # fmt: skip
    """Time the package now (no cache); ``window_s`` is each timing window's
    length (``WINDOWS`` of them per range). Raises ModelNotFoundError /
    CorruptArtifactError for a bad package and FingerprintError when it
    has too few layers to tell a layer from the embedding and the head."""
    from edgemesh.sharding.package.folder import open_package

    begin = time.perf_counter()
    package = open_package(package_dir)
    manifest = package.manifest
    layers = manifest.num_layers
    if layers < 4:
        raise FingerprintError(
            f"'{manifest.name}' has {layers} layers; calibration needs at least 4 "
            "to tell a layer's time from the embedding's and the head's",
            hint="plan this model from the roofline (drop --calibrate)",
        )
    position = max(1, min(position, manifest.context_length // 2))
    timings: dict[str, StageTiming] = {}
    skipped: dict[str, str] = {}
    block = 2
    with tempfile.TemporaryDirectory(prefix="edgemesh-calibrate-") as tmp:
        for cls, precision in candidates(installed, package.precisions, manifest):
            key = f"{cls.name}/{precision}"
            layer_bytes = max(c.weight_bytes.get(precision, 0) for c in manifest.layers)
            block = block_layers(layers, layer_bytes, memory_limit_bytes)
            try:
                setup = _Setup(package, threads, position, window_s, Path(tmp))
                timings[key] = time_option(cls, setup, precision, block)
            except (BackendError, MemoryError) as exc:
                skipped[key] = str(exc)[:300]
                continue
            log.info("calibrated %s: %s", key, timings[key])
    return Calibration(
        model=manifest.name,
        digest=manifest.digest(),
        position=position,
        threads=threads,
        layers=(1, 1 + block),
        timings=timings,
        skipped=skipped,
        seconds=time.perf_counter() - begin,
    )


def cache_path(
    cache_dir: Path, hardware_key: str, digest: str, position: int, threads: int
) -> Path:
    blob = json.dumps([SCHEMA, hardware_key, digest, position, threads])
    return cache_dir / f"calibrate-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def calibrate(
    package_dir: Path, installed: list[str], threads: int, memory_limit_bytes: int,
    hardware_key: str, cache_dir: Path, position: int = POSITION,
    window_s: float = MIN_SECONDS,
) -> Calibration:  # fmt: skip
    """Cached ``run_calibration``: ``hardware_key`` is ``measure.cache_key``
    (CPU, cores, memory limit, library versions), so any change of those, or
    of the package, times again."""
    from edgemesh.sharding.package.folder import open_package

    digest = open_package(package_dir).manifest.digest()
    path = cache_path(cache_dir, hardware_key, digest, position, threads)
    try:
        return Calibration.from_dict("this box", json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EdgemeshError):
        log.info("ignoring unreadable calibration cache %s", path)
    found = run_calibration(package_dir, installed, threads, memory_limit_bytes, position, window_s)
    data = found.to_dict() | {
        "schema": SCHEMA,
        "hardware_key": hardware_key,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".calibrate-", suffix=".json")
        with open(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        Path(tmp).replace(path)
    except OSError as exc:
        raise FingerprintError(
            f"cannot write the calibration cache {path}: {exc}",
            hint="pass another cache_dir or set EDGEMESH_CACHE_DIR",
        ) from exc
    return found


def cached_calibrations(hardware_key: str, threads: int, cache_dir: Path) -> list[Calibration]:
    """Every model this box has calibrated with the same hardware, libraries and
    thread count, read from the cache (nothing is timed). ``--measure`` adds
    them to the profile, so a box calibrated once by hand is priced from its
    timings wherever it is planned (``edgemesh plan``, the mesh's placement)."""
    found: dict[str, Calibration] = {}
    for path in sorted(cache_dir.glob("calibrate-*.json")):
        try:
            data = json.loads(path.read_text())
            wanted = (SCHEMA, hardware_key, threads)
            if (data.get("schema"), data.get("hardware_key"), data.get("threads")) != wanted:
                continue
            cal = Calibration.from_dict("this box", data)
        except (OSError, ValueError, AttributeError, EdgemeshError):
            continue
        if cal.timings:
            found.setdefault(cal.digest, cal)
    return [found[d] for d in sorted(found)]
