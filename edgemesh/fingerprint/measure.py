"""``edgemesh info --measure``: measured matmul speed and memory bandwidth,
cached on disk.

What is measured (see ``kernels``): for each installed backend that can be
micro-benchmarked (onnxruntime, OpenVINO) and for numpy as the ``cpu``
reference, GFLOP/s at decode shapes and weight-streaming GB/s per
precision; plus the copy bandwidth of a large numpy array. llama.cpp,
TensorRT and RKNN have no matmul-level Python API, so they get no figures
of their own. The whole run aims at ~10 s on 2 cores.

Results are cached under ``cache_dir`` (default ``default_cache_dir()``)
in a file named by a hash of the hardware (CPU model, features, effective
cores, memory limit) and the library versions, so a hardware or library
change measures again and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgemesh import paths
from edgemesh.errors import BackendError, FingerprintError, MissingExtraError
from edgemesh.fingerprint import kernels
from edgemesh.fingerprint.model import CpuInfo, MatmulFigure, Measurement

SCHEMA = 3  # bump when what is measured changes, so old caches are ignored
MIB = 1024 * 1024
MATMUL_K = 2048  # hidden sizes of 1-3B models; K = N
WEIGHT_BYTES = 64 * MIB  # per precision: more than an edge box's last-level cache
LLC_MULTIPLE = 2  # ... and at least this many times this box's last-level cache
COPY_BYTES = 128 * MIB
BUDGET_S = 120.0  # stop starting new benchmarks after this (weights are sized past the LLC)
PAIR_S = 0.6  # timing seconds per backend/precision (half at M=1, half at M=8)

_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "onnx": ("onnx",),
    "openvino": ("openvino",),
}


def default_cache_dir() -> Path:
    """``<cache>/measure`` (``edgemesh.paths``: ``$EDGEMESH_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/edgemesh``, else ``~/.cache/edgemesh``)."""
    return paths.measure_dir()


def library_versions(backends: list[str]) -> dict[str, str]:
    """Installed versions of numpy and the measured runtimes (no imports)."""
    probes = {probe_of(b) for b in backends}
    wanted = ["numpy"] + [p for p in sorted(probes - {None}) if p in _DISTRIBUTIONS]
    if "onnxruntime" in probes:
        wanted.append("onnx")
    found: dict[str, str] = {}
    for name in wanted:
        for dist in _DISTRIBUTIONS[name]:
            try:
                found[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return found


def probe_of(backend: str) -> str | None:
    """The micro-benchmark (``kernels.RUNNERS`` key) that prices ``backend``:
    its class's ``matmul_probe``; ``cpu`` is the numpy reference itself."""
    if backend == kernels.REFERENCE:
        return kernels.REFERENCE
    from edgemesh.backends.registry import all_backends

    cls = all_backends().get(backend)
    probe = getattr(cls, "matmul_probe", None)
    return probe if probe in kernels.RUNNERS else None


def measurable(installed: list[str]) -> list[str]:
    """The installed backends with a micro-benchmark, best first, then ``cpu``.

    The rest are priced from ``cpu`` (``sharding.boxes``)."""
    return [b for b in installed if b != kernels.REFERENCE and probe_of(b)] + [kernels.REFERENCE]


def cache_key(cpu: CpuInfo, memory_limit_bytes: int, backends: list[str]) -> str:
    """16 hex chars identifying the hardware and software being measured."""
    blob = json.dumps(
        {
            "schema": SCHEMA,
            "cpu_model": cpu.model,
            "features": sorted(cpu.features),
            "cores_effective": cpu.cores_effective,
            "memory_limit_bytes": memory_limit_bytes,
            "backends": backends,
            "versions": library_versions(backends),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(path: Path) -> Measurement | None:
    try:
        data = json.loads(path.read_text())
        found = Measurement.from_dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # A truncated or foreign file: measuring again replaces it.
        return None
    found.cached = True
    return found


def _store(path: Path, found: Measurement) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".measure-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(found.to_dict(), fh, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        raise FingerprintError(
            f"cannot write the measurement cache {path}: {exc}",
            hint="pass another cache_dir or set EDGEMESH_CACHE_DIR",
        ) from exc


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the largest data/unified cache level of CPU 0, from sysfs."""
    found: tuple[int, int] | None = None
    for index in root.glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(size[-1:], 1)
        try:
            nbytes = int(size.rstrip("KMG")) * scale
        except ValueError:
            continue
        if found is None or level > found[0]:
            found = (level, nbytes)
    return found[1] if found else None


def run_benchmarks(
    backends: list[str], threads: int, memory_limit_bytes: int, budget_s: float = BUDGET_S
) -> Measurement:
    """Measure now (no cache). ``backends`` as from ``measurable``."""
    start = time.perf_counter()
    # A decode step streams every weight from RAM. Weights that fit in the
    # last-level cache (300 MiB on some server CPUs) would measure the cache
    # instead and overstate bandwidth several times, so size past it, within
    # an eighth of the memory limit (building the graphs holds a few copies).
    llc = last_level_cache_bytes() or 0
    cap = max(16 * MIB, memory_limit_bytes // 8)
    weight_bytes = int(min(max(WEIGHT_BYTES, LLC_MULTIPLE * llc), cap))
    copy_bytes = int(min(max(COPY_BYTES, LLC_MULTIPLE * llc), cap))
    bandwidth = kernels.memory_bandwidth(copy_bytes)

    figures: list[MatmulFigure] = []
    skipped: dict[str, str] = {}
    for backend in backends:
        probe = probe_of(backend)
        for precision in kernels.PRECISIONS[probe] if probe else ():
            key = f"{backend}/{precision}"
            # The reference is never skipped for time: engines without a probe
            # of their own (llama.cpp, TensorRT, RKNN) are priced from it.
            if backend != kernels.REFERENCE and time.perf_counter() - start > budget_s:
                skipped[key] = f"time budget of {budget_s:g} s spent"
                continue
            shape = kernels.Shape.for_budget(precision, MATMUL_K, weight_bytes)
            try:
                gflops, gbps = kernels.bench_matmul(probe, precision, shape, threads, PAIR_S)
            except (BackendError, MissingExtraError) as exc:
                skipped[key] = str(exc)[:300]
                continue
            figures.append(MatmulFigure(backend, precision, gflops, gbps))
    return Measurement(
        key="",
        matmul=figures,
        memory_bandwidth_gbps=bandwidth,
        shapes={
            "k": MATMUL_K,
            "n": MATMUL_K,
            "decode_rows": kernels.Shape(MATMUL_K, 1).decode_rows,
            "weight_bytes": weight_bytes,
            "copy_bytes": copy_bytes,
            "threads": threads,
        },
        versions=library_versions(backends),
        skipped=skipped,
        seconds=time.perf_counter() - start,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def measure(
    cpu: CpuInfo, memory_limit_bytes: int, installed: list[str], cache_dir: Path | None = None
) -> Measurement:
    """Cached measurement of this box: read from ``cache_dir`` when the
    hardware/library key matches (``cached`` is True), else measure and
    store. Raises FingerprintError if the cache cannot be written."""
    backends = measurable(installed)
    key = cache_key(cpu, memory_limit_bytes, backends)
    path = (cache_dir or default_cache_dir()) / f"{key}.json"
    found = _load(path)
    if found is not None and found.key == key:
        return found
    threads = max(1, round(cpu.cores_effective))
    found = run_benchmarks(backends, threads, memory_limit_bytes)
    found.key = key
    _store(path, found)
    return found
