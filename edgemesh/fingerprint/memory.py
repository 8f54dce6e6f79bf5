"""RAM from ``/proc/meminfo``, capped by the cgroup's memory limit."""

from __future__ import annotations

from edgemesh.errors import FingerprintError
from edgemesh.fingerprint.model import CgroupInfo, MemoryInfo
from edgemesh.fingerprint.sysroot import Sysroot


def parse_meminfo(text: str) -> dict[str, int]:
    """``{"MemTotal": bytes, ...}``; the kernel writes kB meaning KiB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
        values[key.strip()] = int(parts[0]) * scale
    return values


def read_memory(root: Sysroot, cgroup: CgroupInfo) -> MemoryInfo:
    """Total, effective limit and available bytes.

    ``available_bytes`` is MemAvailable (MemFree on kernels before 3.14),
    further capped by the cgroup's headroom, since a container is killed at
    its own limit however much the host has free.
    """
    text = root.read("/proc/meminfo")
    if text is None:
        raise FingerprintError(f"cannot read {root.path('/proc/meminfo')}")
    info = parse_meminfo(text)
    total = info.get("MemTotal")
    if not total:
        raise FingerprintError(f"no MemTotal line in {root.path('/proc/meminfo')}")
    available = info.get("MemAvailable", info.get("MemFree", total))

    limit = total
    if cgroup.memory_limit_bytes is not None:
        limit = min(total, cgroup.memory_limit_bytes)
        if cgroup.memory_usage_bytes is not None:
            available = min(available, max(0, limit - cgroup.memory_usage_bytes))
    return MemoryInfo(total_bytes=total, limit_bytes=limit, available_bytes=min(available, limit))
