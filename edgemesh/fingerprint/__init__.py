"""The device fingerprint: what a box is, read from the files it exposes.

``collect()`` reads ``/proc`` and ``/sys`` (under ``sysroot`` when given:
then *everything*, the architecture included, comes from the snapshot) and
returns a ``Fingerprint``: CPU and its cgroup-capped cores, RAM and its
cgroup-capped limit, board, accelerators, the backends the hardware calls
for (best first: each registered backend's own ``suits``), which of them
are installed, and the default weight precision (rule in
``edgemesh.fingerprint.policy``). With ``measure=True``
it adds measured matmul and memory figures (cached) and the planner's
``profile``. Only Linux boxes are supported; nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path
from typing import Any

from edgemesh.backends.base import BoxFacts
from edgemesh.errors import ConfigError
from edgemesh.fingerprint.accelerators import read_accelerators
from edgemesh.fingerprint.board import compatible, read_board
from edgemesh.fingerprint.cgroup import read_cgroup
from edgemesh.fingerprint.cpu import read_cpu
from edgemesh.fingerprint.memory import read_memory
from edgemesh.fingerprint.model import (
    Accelerator,
    CgroupInfo,
    CpuInfo,
    Fingerprint,
    MatmulFigure,
    Measurement,
    MemoryInfo,
)
from edgemesh.fingerprint.policy import backends_for, default_precision, installed
from edgemesh.fingerprint.sysroot import Sysroot

__all__ = [
    "Accelerator",
    "CgroupInfo",
    "CpuInfo",
    "Fingerprint",
    "MatmulFigure",
    "Measurement",
    "MemoryInfo",
    "box_facts",
    "collect",
    "default_box_id",
    "usable_profile",
]


def _hostname(root: Sysroot) -> str:
    for path in ("/proc/sys/kernel/hostname", "/etc/hostname"):
        name = root.read_strip(path)
        if name:
            return name.splitlines()[0].strip()
    return socket.gethostname() if root.is_live else "box"


def default_box_id(hostname: str, machine_id: str | None, mac: str | None = None) -> str:
    """``<hostname>-<6 hex>``: readable, and distinct for two boxes that kept
    the same image's hostname. The hex is a sha256 of the machine id and the
    primary interface's MAC (either alone when the other is missing): cloned
    SD cards and network namespaces share the machine id, but not the MAC
    of their own interface. Neither known: the bare hostname (the mesh then
    adds a random suffix and keeps it, ``edgemesh.mesh.box_id``)."""
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-") or "box"
    facts = [f for f in (machine_id, mac) if f]
    if not facts:
        return base
    return f"{base}-{hashlib.sha256('/'.join(facts).encode()).hexdigest()[:6]}"


def box_facts(sysroot: Path = Path("/")) -> tuple[str, str | None, str | None]:
    """(hostname, machine id, MAC of the primary interface) of a box: what its
    default id is made of. The MAC is read on the live box only (the kernel's
    view for this network namespace); a snapshot has none."""
    root = Sysroot(sysroot)
    machine_id = root.read_strip("/etc/machine-id") or root.read_strip("/var/lib/dbus/machine-id")
    mac = None
    if root.is_live:
        from edgemesh.mesh.network import mac_address, primary_interface

        mac = mac_address(primary_interface())
    return _hostname(root), machine_id or None, mac


def collect(
    sysroot: Path = Path("/"),
    *,
    measure: bool = False,
    box_id: str | None = None,
    cache_dir: Path | None = None,
    calibrate: list[Path] | None = None,
) -> Fingerprint:
    """Fingerprint the box whose files are under ``sysroot``.

    ``box_id`` overrides the hostname-based id. ``measure`` runs (or reads
    from ``cache_dir``) the benchmarks of ``edgemesh.fingerprint.measure``;
    it needs the live box, so it raises ConfigError with another sysroot.
    ``calibrate`` lists model packages to time on this box
    (``edgemesh.fingerprint.calibrate``; needs ``measure``); with
    ``measure``, the calibrations cached for this hardware come along too.
    Raises FingerprintError when ``/proc/cpuinfo`` or ``/proc/meminfo``
    cannot be read.
    """
    root = Sysroot(sysroot)
    if measure and not root.is_live:
        raise ConfigError(
            f"--measure runs benchmarks on this machine, not on the snapshot '{sysroot}'",
            hint="drop --sysroot or --measure",
        )
    facts = read_cpu(root)
    cgroup = read_cgroup(root)
    memory = read_memory(root, cgroup)

    cores = float(facts.cores_online)
    if cgroup.cpuset_cores is not None:
        cores = min(cores, float(cgroup.cpuset_cores))
    if cgroup.cpu_quota_cores is not None:
        cores = min(cores, cgroup.cpu_quota_cores)
    cpu = CpuInfo(facts.model, facts.vendor, facts.cores_online, round(cores, 3), facts.features)

    compat = compatible(root)
    accelerators = read_accelerators(root, compat)
    box = BoxFacts(
        arch=facts.arch,
        cpu_vendor=facts.vendor,
        features=tuple(facts.features),
        accelerators=tuple(a.kind for a in accelerators),
        memory_limit_bytes=memory.limit_bytes,
    )
    backends = backends_for(box)
    hostname, machine_id, mac = box_facts(sysroot)

    found = Fingerprint(
        id=box_id or default_box_id(hostname, machine_id, mac),
        hostname=hostname,
        arch=facts.arch,
        cpu=cpu,
        memory=memory,
        board=read_board(root, facts.machine),
        accelerators=accelerators,
        backends=backends,
        installed=installed(backends),
        precision=default_precision(box, backends),
        cgroup=cgroup,
    )
    if calibrate and not measure:
        raise ConfigError("--calibrate needs --measure (the roofline figures scale the timings)")
    if measure:
        from edgemesh.fingerprint.measure import measure as run_measure

        found.measurement = run_measure(cpu, memory.limit_bytes, found.installed, cache_dir)
        found.calibrations = _calibrations(found, calibrate or [], cache_dir)
    return found


def _calibrations(fp: Fingerprint, packages: list[Path], cache_dir: Path | None) -> list:
    """Calibrations cached on this box, with ``packages`` timed (or read) afresh."""
    from edgemesh.fingerprint.calibrate import cached_calibrations, calibrate
    from edgemesh.fingerprint.measure import default_cache_dir

    assert fp.measurement is not None
    folder = cache_dir or default_cache_dir()
    threads = max(1, round(fp.cpu.cores_effective))
    found = {c.digest: c for c in cached_calibrations(fp.measurement.key, threads, folder)}
    for package in packages:
        cal = calibrate(
            Path(package),
            fp.installed,
            threads=threads,
            memory_limit_bytes=fp.memory.limit_bytes,
            hardware_key=fp.measurement.key,
            cache_dir=folder,
        )
        found[cal.digest] = cal
    return [found[d] for d in sorted(found)]


def usable_profile(box_id: str | None = None, *, reserve_bytes: int = 0) -> dict[str, Any]:
    """This box's measured planner profile, with the memory its stages can
    really use.

    ``memory_limit_bytes`` becomes what is *available* now, less
    ``reserve_bytes``: the box's agent, Ray node and the caller already live
    inside its limit (a cgroup's usage is counted against it), so planning
    against the bare limit over-commits and stages get OOM-killed on small
    boxes.
    """
    fp = collect(measure=True, box_id=box_id)
    profile = fp.profile()
    usable = min(fp.memory.limit_bytes, fp.memory.available_bytes) - reserve_bytes
    profile["memory_limit_bytes"] = max(0, usable)
    return profile
