"""The CPU from ``/proc/cpuinfo`` and ``/sys/devices/system/cpu/online``.

x86 kernels print ``vendor_id``, ``model name`` and ``flags`` per processor;
arm64 kernels print ``Features`` and the ``CPU implementer``/``CPU part``
ids (no model name), so the core names come from the table below.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from edgemesh.errors import FingerprintError
from edgemesh.fingerprint.sysroot import Sysroot

# (implementer, part) -> core name, from the Arm and vendor TRMs (MIDR_EL1).
_ARM_PARTS: dict[tuple[int, int], str] = {
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD04): "Cortex-A35",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4B): "Cortex-A78C",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720",
    (0x4E, 0x004): "Carmel",
}
_ARM_IMPLEMENTERS = {0x41: "ARM", 0x4E: "NVIDIA", 0x51: "Qualcomm", 0x61: "Apple", 0xC0: "Ampere"}


@dataclass(frozen=True)
class CpuFacts:
    """Parsed ``/proc/cpuinfo`` before the cgroup caps it."""

    arch: str
    model: str
    vendor: str | None
    cores_online: int
    features: tuple[str, ...]
    machine: dict[str, str]
    """Trailing non-processor lines (``hardware``, ``revision``, ``model``)."""


def parse_cpuinfo(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split cpuinfo into per-processor blocks and trailing machine lines
    (arm kernels end with ``Hardware``/``Revision``/``Model`` lines)."""
    processors: list[dict[str, str]] = []
    extra: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if not fields:
            continue
        if "processor" in fields and fields["processor"].isdigit():
            processors.append(fields)
        else:
            extra.update(fields)
    return processors, extra


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,6,8-9"`` -> ``[0, 1, 2, 3, 6, 8, 9]`` (kernel cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            cpus.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError as exc:
            raise FingerprintError(f"cannot parse CPU list '{text.strip()}'") from exc
    return cpus


def _arch(root: Sysroot, processors: list[dict[str, str]], features: set[str]) -> str:
    # /proc/sys/kernel/arch is the kernel's own `uname -m` (Linux >= 6.1).
    arch = root.read_strip("/proc/sys/kernel/arch")
    if arch:
        return arch
    first = processors[0] if processors else {}
    if "vendor_id" in first or "flags" in first:
        return "x86_64" if "lm" in features else "i686"
    if "cpu architecture" in first or "features" in first:
        # arm64 kernels say "CPU architecture: 8" (old ones "AArch64");
        # 32-bit kernels say 7 or less.
        level = first.get("cpu architecture", "8")
        return "armv7l" if level.isdigit() and int(level) < 8 else "aarch64"
    if "isa" in first and first["isa"].startswith("rv64"):
        return "riscv64"
    if root.is_live:
        return platform.machine()
    raise FingerprintError("cannot tell the architecture from /proc/cpuinfo")


def _arm_model(processors: list[dict[str, str]]) -> tuple[str, str | None]:
    """``"ARM Cortex-A76"``, or ``"ARM Cortex-A55 x4 + Cortex-A76 x4"`` for
    big.LITTLE, listed in processor order."""
    counts: dict[str, int] = {}
    vendor = None
    for proc in processors:
        try:
            impl = int(proc.get("cpu implementer", ""), 16)
            part = int(proc.get("cpu part", ""), 16)
        except ValueError:
            continue
        vendor = vendor or _ARM_IMPLEMENTERS.get(impl, f"implementer 0x{impl:02x}")
        name = _ARM_PARTS.get((impl, part), f"part 0x{part:03x}")
        counts[name] = counts.get(name, 0) + 1
    if not counts:
        name = processors[0].get("model name") if processors else None
        return (name or "unknown ARM CPU"), vendor
    if len(counts) == 1:
        return f"{vendor} {next(iter(counts))}", vendor
    return f"{vendor} " + " + ".join(f"{n} x{c}" for n, c in counts.items()), vendor


def read_cpu(root: Sysroot) -> CpuFacts:
    """Parse the CPU facts; raises FingerprintError without /proc/cpuinfo."""
    text = root.read("/proc/cpuinfo")
    if text is None:
        raise FingerprintError(
            f"cannot read {root.path('/proc/cpuinfo')}",
            hint="edgemesh reads Linux /proc and /sys; pass --sysroot for a snapshot",
        )
    processors, extra = parse_cpuinfo(text)
    first = processors[0] if processors else {}
    # x86 lists `flags`, arm64 `Features`; both are kernel names already.
    raw = first.get("flags") or first.get("features") or ""
    features = {f.lower() for f in raw.split()}
    arch = _arch(root, processors, features)

    if "model name" in first and arch in ("x86_64", "i686"):
        model, vendor = " ".join(first["model name"].split()), first.get("vendor_id")
    elif arch.startswith(("aarch64", "arm")):
        model, vendor = _arm_model(processors)
    else:
        model = first.get("model name") or first.get("uarch") or extra.get("hardware", "unknown")
        vendor = first.get("vendor_id")

    online_text = root.read("/sys/devices/system/cpu/online")
    if online_text and online_text.strip():
        cores = len(parse_cpu_list(online_text))
    elif processors:
        cores = len(processors)
    else:
        cores = (os.cpu_count() or 1) if root.is_live else 1
    return CpuFacts(arch, model, vendor, cores, tuple(sorted(features)), extra)
