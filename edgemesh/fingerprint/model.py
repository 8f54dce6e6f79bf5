"""The fingerprint's data: plain dataclasses that round-trip through JSON.

``Fingerprint.to_dict()`` is exactly what ``edgemesh info --json`` prints;
``Fingerprint.from_dict`` reads it back (a box's fingerprint travels to the
planner over the mesh).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from edgemesh.sharding.planner.calibration import Calibration, parse_calibrations


@dataclass(frozen=True)
class CpuInfo:
    """What the kernel says about the CPU, capped by the cgroup.

    ``cores_effective`` is a float because a CFS quota of 150000/100000 is
    1.5 CPUs of time; it is never above ``cores_online``.
    """

    model: str
    vendor: str | None
    cores_online: int
    cores_effective: float
    features: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CpuInfo:
        return cls(
            model=d["model"],
            vendor=d.get("vendor"),
            cores_online=int(d["cores_online"]),
            cores_effective=float(d["cores_effective"]),
            features=tuple(d.get("features", ())),
        )


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes of RAM: ``limit_bytes`` is min(RAM, cgroup limit); what a box
    may actually use. ``available_bytes`` is also capped by the cgroup
    headroom (limit minus the cgroup's current usage)."""

    total_bytes: int
    limit_bytes: int
    available_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryInfo:
        return cls(int(d["total_bytes"]), int(d["limit_bytes"]), int(d["available_bytes"]))


@dataclass(frozen=True)
class CgroupInfo:
    """The limits found in the process's own cgroup and its ancestors.

    ``version`` is ``"v1"``, ``"v2"`` or None (no cgroup controllers seen);
    each limit is None when unlimited.
    """

    version: str | None = None
    path: str | None = None
    cpu_quota_cores: float | None = None
    cpuset_cores: int | None = None
    memory_limit_bytes: int | None = None
    memory_usage_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CgroupInfo:
        return cls(**(d or {}))


@dataclass(frozen=True)
class Accelerator:
    """One accelerator: ``kind`` is one of ``nvidia-gpu``, ``jetson-gpu``,
    ``rockchip-npu``, ``intel-gpu``, ``amd-gpu``.

    ``memory_bytes`` is None when the device shares system RAM (Jetson,
    integrated GPUs) or its size cannot be read from files.
    """

    kind: str
    name: str
    memory_bytes: int | None = None
    driver: str | None = None
    bus: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Accelerator:
        return cls(
            kind=d["kind"],
            name=d["name"],
            memory_bytes=d.get("memory_bytes"),
            driver=d.get("driver"),
            bus=d.get("bus"),
        )


@dataclass(frozen=True)
class MatmulFigure:
    """Measured speed of one backend at one weight precision.

    ``gflops``: 2·M·K·N per second at decode shapes (M = a few rows).
    ``bandwidth_gbps``: weight bytes streamed per second at M = 1, with
    more weights than fit in cache, i.e. what bounds decode speed.
    """

    backend: str
    precision: str
    gflops: float
    bandwidth_gbps: float

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass
class Measurement:
    """What ``--measure`` found; ``cached`` says it came from the disk cache."""

    key: str
    matmul: list[MatmulFigure]
    memory_bandwidth_gbps: float
    shapes: dict[str, int]
    versions: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    measured_at: str = ""
    cached: bool = False

    def figure(self, backend: str, precision: str) -> MatmulFigure | None:
        for fig in self.matmul:
            if fig.backend == backend and fig.precision == precision:
                return fig
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "measured_at": self.measured_at,
            "memory_bandwidth_gbps": round(self.memory_bandwidth_gbps, 2),
            "matmul": {
                f.key: {"gflops": round(f.gflops, 2), "bandwidth_gbps": round(f.bandwidth_gbps, 2)}
                for f in self.matmul
            },
            "shapes": dict(self.shapes),
            "versions": dict(self.versions),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        figures = []
        for key, value in d.get("matmul", {}).items():
            backend, _, precision = key.partition("/")
            figures.append(
                MatmulFigure(
                    backend, precision, float(value["gflops"]), float(value["bandwidth_gbps"])
                )
            )
        return cls(
            key=d["key"],
            matmul=figures,
            memory_bandwidth_gbps=float(d["memory_bandwidth_gbps"]),
            shapes={k: int(v) for k, v in d.get("shapes", {}).items()},
            versions=dict(d.get("versions", {})),
            skipped=dict(d.get("skipped", {})),
            seconds=float(d.get("seconds", 0.0)),
            measured_at=d.get("measured_at", ""),
            cached=bool(d.get("cached", False)),
        )


@dataclass
class Fingerprint:
    """Everything edgemesh needs to know about one box.

    ``backends`` are the ones this hardware calls for, best first;
    ``installed`` is the subset whose runtime imports here, same order.
    ``precision`` is the default weight precision (see ``policy``).
    """

    id: str
    hostname: str
    arch: str
    cpu: CpuInfo
    memory: MemoryInfo
    board: str | None
    accelerators: list[Accelerator]
    backends: list[str]
    installed: list[str]
    precision: str
    cgroup: CgroupInfo = field(default_factory=CgroupInfo)
    measurement: Measurement | None = None
    calibrations: list[Calibration] = field(default_factory=list)
    """Timings of real models on this box (``--calibrate``), one per model."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``edgemesh info --json``; ``profile`` and ``measure``
        only appear once the box has been measured."""
        d: dict[str, Any] = {
            "id": self.id,
            "hostname": self.hostname,
            "arch": self.arch,
            "board": self.board,
            "cpu": self.cpu.to_dict(),
            "memory": self.memory.to_dict(),
            "cgroup": self.cgroup.to_dict(),
            "accelerators": [a.to_dict() for a in self.accelerators],
            "backends": list(self.backends),
            "installed": list(self.installed),
            "precision": self.precision,
            "digest": self.digest(),
        }
        if self.measurement is not None:
            d["measure"] = self.measurement.to_dict()
            d["profile"] = self.profile()  # calibrations, if any, live in the profile
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        """Rebuild from ``to_dict()`` output (``digest`` and ``profile`` are
        derived, so they are recomputed rather than read)."""
        measure = d.get("measure")
        return cls(
            id=d["id"],
            hostname=d["hostname"],
            arch=d["arch"],
            cpu=CpuInfo.from_dict(d["cpu"]),
            memory=MemoryInfo.from_dict(d["memory"]),
            board=d.get("board"),
            accelerators=[Accelerator.from_dict(a) for a in d.get("accelerators", [])],
            backends=list(d["backends"]),
            installed=list(d.get("installed", [])),
            precision=d["precision"],
            cgroup=CgroupInfo.from_dict(d.get("cgroup")),
            measurement=Measurement.from_dict(measure) if measure else None,
            calibrations=list(
                parse_calibrations(d["id"], (d.get("profile") or {}).get("calibration"))
            ),
        )

    def stable_fields(self) -> dict[str, Any]:
        """The hardware facts that do not change while the box runs (no
        hostname, no free memory, no measurements)."""
        return {
            "arch": self.arch,
            "cpu_model": self.cpu.model,
            "cpu_features": sorted(self.cpu.features),
            "cores_online": self.cpu.cores_online,
            "cores_effective": self.cpu.cores_effective,
            "memory_limit_bytes": self.memory.limit_bytes,
            "board": self.board,
            "accelerators": sorted(
                [a.kind, a.name, a.memory_bytes or 0] for a in self.accelerators
            ),
        }

    def digest(self) -> str:
        """16 hex chars of sha256 over ``stable_fields`` (announced over mDNS
        so peers can tell whether a box's hardware changed)."""
        blob = json.dumps(self.stable_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """A few fields for status tables and mDNS properties."""
        return {
            "arch": self.arch,
            "cores_effective": self.cpu.cores_effective,
            "memory_limit_bytes": self.memory.limit_bytes,
            "board": self.board,
            "accelerators": [a.kind for a in self.accelerators],
            "backends": list(self.backends),
            "precision": self.precision,
        }

    def profile(self) -> dict[str, Any]:
        """The planner's view of the box.

        ``compute`` is keyed ``"<backend>/<precision>"`` with measured
        ``gflops`` and ``bandwidth_gbps``; it holds the installed backends
        that were measured plus ``cpu/fp32`` (a numpy reference a planner may
        use as a floor for backends that cannot be micro-benchmarked, such
        as llama.cpp). Empty before ``--measure``. Links are measured by the
        mesh, so ``link_gbps``/``link_latency_ms`` are None here.
        """
        compute: dict[str, dict[str, float]] = {}
        bandwidth = None
        if self.measurement is not None:
            bandwidth = round(self.measurement.memory_bandwidth_gbps, 2)
            wanted = set(self.installed) | {"cpu"}
            for fig in self.measurement.matmul:
                if fig.backend in wanted:
                    compute[fig.key] = {
                        "gflops": round(fig.gflops, 2),
                        "bandwidth_gbps": round(fig.bandwidth_gbps, 2),
                    }
        return {
            "id": self.id,
            "memory_limit_bytes": self.memory.limit_bytes,
            "cores_effective": self.cpu.cores_effective,
            "precision": self.precision,
            "backends": list(self.installed),
            "compute": compute,
            "memory_bandwidth_gbps": bandwidth,
            "link_gbps": None,
            "link_latency_ms": None,
            "calibration": [c.to_dict() for c in self.calibrations],
        }
