"""CPU and memory limits from cgroup v1 and v2.

The process's own cgroup comes from ``/proc/self/cgroup``; limits are read
from that folder and every ancestor up to the mount root, and the smallest
wins (a limit on a parent slice binds its children too). When the folder
named there does not exist, as in a container whose cgroup mount *is* its
own cgroup, the walk starts at the mount root.

v2: ``cpu.max`` ("max 100000" or "<quota> <period>"), ``memory.max``,
``memory.current``, ``cpuset.cpus.effective``.
v1: ``cpu/cpu.cfs_quota_us`` (-1 = none) over ``cpu.cfs_period_us``,
``memory/memory.limit_in_bytes`` (a huge page-rounded value = none),
``memory.usage_in_bytes``, ``cpuset/cpuset.effective_cpus``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgemesh.fingerprint.cpu import parse_cpu_list
from edgemesh.fingerprint.model import CgroupInfo
from edgemesh.fingerprint.sysroot import Sysroot

# v1 reports "no limit" as LONG_MAX rounded down to a page; anything this
# large is not a real limit on any box.
_UNLIMITED = 1 << 62
_V2_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def _memberships(root: Sysroot) -> dict[str, str]:
    """controller -> cgroup path; the v2 entry is under the key ``""``."""
    found: dict[str, str] = {}
    for line in (root.read("/proc/self/cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            found[""] = path
        for name in controllers.split(","):
            if name:
                found[name] = path
                found.setdefault(f"mount:{name}", controllers)
    return found


def _chain(mount: Path, cg_path: str) -> list[Path]:
    """The cgroup's folder and its ancestors that exist, leaf first."""
    parts = [p for p in cg_path.split("/") if p and p not in (".", "..")]
    dirs = []
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        if folder.is_dir():
            dirs.append(folder)
    return dirs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _min_over(dirs: list[Path], name: str, parse: Callable[[str], float | None]) -> float | None:
    best: float | None = None
    for folder in dirs:
        text = _read(folder / name)
        value = parse(text) if text else None
        if value is not None and (best is None or value < best):
            best = value
    return best


def _first(dirs: list[Path], name: str) -> str | None:
    for folder in dirs:
        text = _read(folder / name)
        if text:
            return text
    return None


def _bytes_or_none(text: str) -> float | None:
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    value = int(text)
    return None if value < 0 or value >= _UNLIMITED else value


def _v2_cpu(text: str) -> float | None:
    quota, _, period = text.partition(" ")
    period = period or "100000"
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # "max": no quota
    return int(quota) / int(period)


def _cpus(text: str | None) -> int | None:
    return len(parse_cpu_list(text)) if text else None


def _v1_mount(root: Sysroot, member: dict[str, str], controller: str) -> Path | None:
    # Distros mount v1 controllers alone (cpu) or co-mounted (cpu,cpuacct).
    names = [controller, member.get(f"mount:{controller}", controller)]
    names += [f"{controller},cpuacct", f"cpuacct,{controller}"]
    for name in names:
        mount = root.path(f"/sys/fs/cgroup/{name}")
        if mount.is_dir():
            return mount
    return None


def _minimum(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def read_cgroup(root: Sysroot) -> CgroupInfo:
    """The effective CPU/memory limits of this process (or of the process
    that the snapshot's ``/proc/self/cgroup`` was taken from)."""
    member = _memberships(root)

    v2_dirs: list[Path] = []
    v2_controllers: set[str] = set()
    for mount in _V2_MOUNTS:
        controllers = root.read(f"{mount}/cgroup.controllers")
        if controllers is not None:
            v2_controllers = set(controllers.split())
            v2_dirs = _chain(root.path(mount), member.get("", "/"))
            break
    v2_quota = _min_over(v2_dirs, "cpu.max", _v2_cpu)
    v2_memory = _min_over(v2_dirs, "memory.max", _bytes_or_none)
    v2_usage = _bytes_or_none(_first(v2_dirs, "memory.current") or "")
    v2_cpuset = _cpus(_first(v2_dirs, "cpuset.cpus.effective"))

    v1_quota = v1_memory = v1_usage = None
    v1_cpuset = None
    v1_seen = False
    cpu_mount = _v1_mount(root, member, "cpu")
    if cpu_mount is not None:
        v1_seen = True
        for folder in _chain(cpu_mount, member.get("cpu", "/")):
            quota = _bytes_or_none(_read(folder / "cpu.cfs_quota_us") or "")
            period = _bytes_or_none(_read(folder / "cpu.cfs_period_us") or "")
            if quota and period:
                v1_quota = _minimum(v1_quota, quota / period)
    mem_mount = _v1_mount(root, member, "memory")
    if mem_mount is not None:
        v1_seen = True
        dirs = _chain(mem_mount, member.get("memory", "/"))
        v1_memory = _min_over(dirs, "memory.limit_in_bytes", _bytes_or_none)
        v1_usage = _bytes_or_none(_first(dirs, "memory.usage_in_bytes") or "")
    cpuset_mount = _v1_mount(root, member, "cpuset")
    if cpuset_mount is not None:
        dirs = _chain(cpuset_mount, member.get("cpuset", "/"))
        v1_cpuset = _cpus(_first(dirs, "cpuset.effective_cpus") or _first(dirs, "cpuset.cpus"))

    if v2_controllers & {"cpu", "memory"}:
        version, path = "v2", member.get("", "/")
    elif v1_seen:
        version, path = "v1", member.get("memory", member.get("cpu", "/"))
    else:
        version, path = None, None
    memory = _minimum(v2_memory, v1_memory)
    usage = _minimum(v2_usage, v1_usage)
    cpuset = _minimum(v2_cpuset, v1_cpuset)
    return CgroupInfo(
        version=version,
        path=path,
        cpu_quota_cores=_minimum(v2_quota, v1_quota),
        cpuset_cores=int(cpuset) if cpuset else None,
        memory_limit_bytes=int(memory) if memory is not None else None,
        memory_usage_bytes=int(usage) if usage is not None else None,
    )
