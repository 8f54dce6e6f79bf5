"""Live readings of a box: CPU use, memory used/limit, temperatures, power.

Everything is read from files under a ``Sysroot`` (``/`` on the live box, a
snapshot folder in tests), so the same code reads a Raspberry Pi, a Jetson
or a container:

- CPU: ``/proc/stat``'s aggregate line; a percentage needs two readings,
  so ``LiveSampler`` keeps the previous one (a lone reading has ``None``).
- Memory: the cgroup's usage against its limit when the process is in a
  limited cgroup (a container is killed at its own limit, whatever the host
  has free), else ``MemTotal - MemAvailable`` against ``MemTotal``.
- Temperatures: ``/sys/class/thermal/thermal_zone*/{type,temp}`` and
  ``/sys/class/hwmon/hwmon*/temp*_input`` (millidegrees Celsius).
- Power: hwmon ``power*_input``/``power*_average`` (microwatts); INA3221
  rails exposed through hwmon as ``in*_input`` (mV) x ``curr*_input`` (mA)
  with ``in*_label`` (Jetson Orin); the older Jetson ``ina3221x`` IIO driver's
  ``rail_name_N`` + ``in_power N_input`` (mW) (Xavier, Nano).

A board that exposes none of these gives empty lists, never an error.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.fingerprint.cgroup import read_cgroup
from edgemesh.fingerprint.memory import parse_meminfo
from edgemesh.fingerprint.sysroot import Sysroot

# A thermal zone reading outside this range is a disconnected probe (some
# boards report -273 °C or 0x7fffffff), not a temperature.
_PLAUSIBLE_C = (-40.0, 150.0)


@dataclass(frozen=True)
class Sensor:
    """One reading: ``value`` in °C for temperatures, W for power."""

    name: str
    value: float
    source: str
    """The sysfs folder it came from, relative to the root (for people debugging)."""


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


@dataclass(frozen=True)
class LiveReading:
    at: float
    cpu_percent: float | None
    load1: float | None
    memory_used_bytes: int
    memory_limit_bytes: int
    memory_source: str
    """``cgroup`` or ``host``: which limit ``memory_limit_bytes`` is."""
    temperatures: list[Sensor] = field(default_factory=list)
    power: list[Sensor] = field(default_factory=list)
    cpu_times: CpuTimes | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "cpu_percent": self.cpu_percent,
            "load1": self.load1,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "memory_source": self.memory_source,
            "temperatures": [
                {"name": s.name, "celsius": s.value, "source": s.source} for s in self.temperatures
            ],
            "power": [{"name": s.name, "watts": s.value, "source": s.source} for s in self.power],
        }


def cpu_times(root: Sysroot) -> CpuTimes | None:
    """The aggregate ``cpu`` line of ``/proc/stat`` (jiffies)."""
    text = root.read("/proc/stat")
    if not text:
        return None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:] if v.isdigit()]
            if len(values) < 4:
                return None
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            # guest/guest_nice (9, 10) are already counted in user/nice.
            total = sum(values[:8])
            return CpuTimes(busy=total - idle, total=total)
    return None


def cpu_percent(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Busy share of all CPUs between two readings, 0-100."""
    if before is None or after is None or after.total <= before.total:
        return None
    return round(100.0 * (after.busy - before.busy) / (after.total - before.total), 1)


def read_memory_use(root: Sysroot) -> tuple[int, int, str]:
    """(used, limit, source) in bytes; see the module docstring."""
    info = parse_meminfo(root.read("/proc/meminfo") or "")
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", total))
    cgroup = read_cgroup(root)
    limit = cgroup.memory_limit_bytes
    if limit is not None and cgroup.memory_usage_bytes is not None and (not total or limit < total):
        return cgroup.memory_usage_bytes, limit, "cgroup"
    return max(0, total - available), total, "host"


def _number(root: Sysroot, path: str) -> float | None:
    text = root.read_strip(path)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _children(root: Sysroot, folder: str, pattern: str) -> list[Path]:
    base = root.path(folder)
    try:
        return sorted(base.glob(pattern), key=lambda p: (len(p.name), p.name))
    except OSError:
        return []


def _rel(root: Sysroot, path: Path) -> str:
    return "/" + str(path.relative_to(root.root)).lstrip("/")


def thermal_zones(root: Sysroot) -> list[Sensor]:
    out = []
    for zone in _children(root, "/sys/class/thermal", "thermal_zone*"):
        rel = _rel(root, zone)
        milli = _number(root, f"{rel}/temp")
        if milli is None:
            continue
        celsius = round(milli / 1000.0, 1)
        if not _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
            continue
        out.append(Sensor(root.read_strip(f"{rel}/type") or zone.name, celsius, rel))
    return out


def hwmon(root: Sysroot) -> tuple[list[Sensor], list[Sensor]]:
    """(temperatures, power) from every ``/sys/class/hwmon/hwmon*``."""
    temps: list[Sensor] = []
    power: list[Sensor] = []
    for dev in _children(root, "/sys/class/hwmon", "hwmon*"):
        rel = _rel(root, dev)
        chip = root.read_strip(f"{rel}/name") or dev.name
        for f in sorted(dev.glob("temp*_input")):
            n = f.name[len("temp") : -len("_input")]
            milli = _number(root, f"{rel}/{f.name}")
            if milli is None:
                continue
            label = root.read_strip(f"{rel}/temp{n}_label")
            celsius = round(milli / 1000.0, 1)
            if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
                temps.append(Sensor(f"{chip} {label}" if label else chip, celsius, rel))
        for f in sorted(dev.glob("power*_input")) + sorted(dev.glob("power*_average")):
            n = f.name[len("power") :].split("_")[0]
            if f.name.endswith("_average") and (dev / f"power{n}_input").exists():
                continue  # the instant reading already counted
            micro = _number(root, f"{rel}/{f.name}")
            if micro is None:
                continue
            label = root.read_strip(f"{rel}/power{n}_label")
            power.append(Sensor(f"{chip} {label}" if label else chip, round(micro / 1e6, 3), rel))
        # INA3221 (Jetson Orin): bus voltage and current per channel, no power file.
        for f in sorted(dev.glob("curr*_input")):
            n = f.name[len("curr") : -len("_input")]
            if (dev / f"power{n}_input").exists():
                continue
            milliamp = _number(root, f"{rel}/{f.name}")
            millivolt = _number(root, f"{rel}/in{n}_input")
            if milliamp is None or millivolt is None:
                continue
            label = root.read_strip(f"{rel}/in{n}_label") or root.read_strip(f"{rel}/curr{n}_label")
            if label is not None and label.upper().startswith("SUM OF"):
                continue  # the chip's own sum of the other rails: counted already
            watts = round(milliamp * millivolt / 1e6, 3)
            power.append(Sensor(label or f"{chip} rail {n}", watts, rel))
    return temps, power


def jetson_iio_rails(root: Sysroot) -> list[Sensor]:
    """Older Jetson INA3221 rails (``ina3221x`` IIO driver), milliwatts."""
    out = []
    for dev in _children(root, "/sys/bus/i2c/drivers/ina3221x", "*/iio:device*"):
        rel = _rel(root, dev)
        for name_file in sorted(dev.glob("rail_name_*")):
            n = name_file.name.rsplit("_", 1)[1]
            milliwatt = _number(root, f"{rel}/in_power{n}_input")
            name = root.read_strip(f"{rel}/{name_file.name}")
            if milliwatt is None or name is None:
                continue
            out.append(Sensor(name, round(milliwatt / 1000.0, 3), rel))
    return out


def _merge(zones: list[Sensor], chips: list[Sensor]) -> list[Sensor]:
    """Zones plus hwmon readings, without the hwmon mirror that the kernel
    registers for each thermal zone (``cpu-thermal`` appears as hwmon ``cpu_thermal``)."""
    seen = {(z.name.replace("-", "_"), z.value) for z in zones}
    return zones + [c for c in chips if (c.name.replace("-", "_"), c.value) not in seen]


def load1(root: Sysroot) -> float | None:
    text = root.read_strip("/proc/loadavg")
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None


def read_live(root: Sysroot | str | Path = "/", previous: LiveReading | None = None) -> LiveReading:
    """One reading of the box at ``root``; ``previous`` gives the CPU percentage."""
    sysroot = root if isinstance(root, Sysroot) else Sysroot(root)
    times = cpu_times(sysroot)
    used, limit, source = read_memory_use(sysroot)
    temps, power = hwmon(sysroot)
    return LiveReading(
        at=time.time(),
        cpu_percent=cpu_percent(previous.cpu_times if previous else None, times),
        load1=load1(sysroot),
        memory_used_bytes=used,
        memory_limit_bytes=limit,
        memory_source=source,
        temperatures=_merge(thermal_zones(sysroot), temps),
        power=power + jetson_iio_rails(sysroot),
        cpu_times=times,
    )


class LiveSampler:
    """This box's readings, at most one per ``min_interval_s`` (thread-safe).

    The first call reads twice, ``first_gap_s`` apart, so even the first
    answer has a CPU percentage."""

    def __init__(
        self, root: str | Path = "/", min_interval_s: float = 2.0, first_gap_s: float = 0.2
    ) -> None:
        self._root = Sysroot(root)
        self._min = min_interval_s
        self._gap = first_gap_s
        self._last: LiveReading | None = None
        self._lock = threading.Lock()

    def read(self) -> LiveReading:
        with self._lock:
            last = self._last
            if last is not None and time.time() - last.at < self._min:
                return last
            if last is None:
                last = read_live(self._root)
                time.sleep(self._gap)
            self._last = read_live(self._root, last)
            return self._last


_SAMPLER: LiveSampler | None = None


def live_dict() -> dict[str, Any]:
    """This box's reading as a dict (what a Ray task pinned to a box returns)."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = LiveSampler()
    return _SAMPLER.read().to_dict()
