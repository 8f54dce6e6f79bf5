"""Live box readings (edgemesh.fingerprint.sensors) on snapshots of real boards.

The snapshot files under tests/data/sysroots are what those boards expose:
thermal zones, hwmon chips (coretemp, k10temp, an ACPI power meter, the
Jetson Orin's INA3221), /proc/stat and the cgroup files of two containers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgemesh.fingerprint.sensors import (
    CpuTimes,
    LiveSampler,
    cpu_percent,
    jetson_iio_rails,
    read_live,
)
from edgemesh.fingerprint.sysroot import Sysroot

SYSROOTS = Path(__file__).parent / "data" / "sysroots"


def _names(sensors: list[dict]) -> dict[str, float]:
    return {s["name"]: s.get("celsius", s.get("watts")) for s in sensors}


def test_jetson_orin_thermal_zones_and_ina3221_rails() -> None:
    d = read_live(SYSROOTS / "jetson-agx-orin").to_dict()
    temps = _names(d["temperatures"])
    assert temps["gpu-thermal"] == 46.5
    assert temps["tj-thermal"] == 49.0
    assert "cv1-thermal" not in temps  # its probe reads -256 °C: disconnected
    power = _names(d["power"])
    # bus mV x shunt mA, per labelled channel; the chip's "sum of" channel is no rail
    assert power == {"VDD_GPU_SOC": 4.75, "VDD_CPU_CV": 2.298, "VIN_SYS_5V0": 2.813}
    assert d["load1"] == 1.2


def test_pi_zone_is_not_listed_twice_through_its_hwmon_mirror() -> None:
    d = read_live(SYSROOTS / "rpi5").to_dict()
    assert [t["name"] for t in d["temperatures"]] == ["cpu-thermal"]
    assert d["temperatures"][0]["celsius"] == 52.0
    assert d["power"] == []
    assert d["memory_source"] == "host"
    # MemTotal - MemAvailable of the snapshot's meminfo (kB are KiB)
    assert d["memory_limit_bytes"] == 8245360 * 1024
    assert d["memory_used_bytes"] == (8245360 - 7629184) * 1024


def test_x86_hwmon_labels_and_power_meter() -> None:
    nuc = _names(read_live(SYSROOTS / "nuc12-i7").to_dict()["temperatures"])
    assert nuc["coretemp Package id 0"] == 45.0
    assert nuc["nvme Composite"] == 38.9
    assert nuc["x86_pkg_temp"] == 45.0
    epyc = read_live(SYSROOTS / "server-epyc-a10").to_dict()
    assert _names(epyc["temperatures"]) == {"k10temp Tctl": 41.2}
    assert _names(epyc["power"]) == {"power_meter": 182.0}  # power1_average in µW


def test_rk3588_zones() -> None:
    temps = _names(read_live(SYSROOTS / "rock5b-rk3588").to_dict()["temperatures"])
    assert temps["npu-thermal"] == 42.6
    assert len(temps) == 7


@pytest.mark.parametrize(
    ("name", "used", "limit"),
    [
        ("container-cgroup-v1", 314572800, 2147483648),
        ("container-cgroup-v2", 1073741824, None),
    ],
)
def test_container_memory_is_the_cgroups(name: str, used: int, limit: int | None) -> None:
    from edgemesh.fingerprint import collect

    d = read_live(SYSROOTS / name).to_dict()
    assert d["memory_source"] == "cgroup"
    assert d["memory_used_bytes"] == used
    # the same limit the fingerprint (and so the planner) uses
    assert d["memory_limit_bytes"] == (limit or collect(SYSROOTS / name).memory.limit_bytes)
    assert d["temperatures"] == [] and d["power"] == []


def test_older_jetson_iio_rails(tmp_path: Path) -> None:
    # Xavier NX / Nano: the ina3221x IIO driver, power per rail in mW.
    root = tmp_path / "xavier"
    shutil.copytree(SYSROOTS / "jetson-agx-orin", root)
    dev = root / "sys/bus/i2c/drivers/ina3221x/7-0040/iio:device0"
    dev.mkdir(parents=True)
    for n, (name, mw) in enumerate(
        [("VDD_IN", "5120"), ("VDD_CPU_GPU_CV", "1630"), ("VDD_SOC", "1220")]
    ):
        (dev / f"rail_name_{n}").write_text(name + "\n")
        (dev / f"in_power{n}_input").write_text(mw + "\n")
    rails = {s.name: s.value for s in jetson_iio_rails(Sysroot(root))}
    assert rails == {"VDD_IN": 5.12, "VDD_CPU_GPU_CV": 1.63, "VDD_SOC": 1.22}
    assert "VDD_IN" in _names(read_live(root).to_dict()["power"])


def test_cpu_percent_from_two_readings() -> None:
    assert cpu_percent(CpuTimes(100, 400), CpuTimes(150, 500)) == 50.0
    assert cpu_percent(None, CpuTimes(1, 2)) is None
    assert cpu_percent(CpuTimes(5, 10), CpuTimes(5, 10)) is None  # no time passed


def test_live_sampler_on_this_box() -> None:
    sampler = LiveSampler(min_interval_s=60)
    first = sampler.read()
    assert first.cpu_percent is not None and 0.0 <= first.cpu_percent <= 100.0
    assert 0 < first.memory_used_bytes <= first.memory_limit_bytes
    assert sampler.read() is first  # cached within the interval
