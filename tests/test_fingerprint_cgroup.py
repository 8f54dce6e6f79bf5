"""The fingerprint reads the limits of a real cgroup it runs in (not a snapshot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgemesh.lab import cgroups

pytestmark = pytest.mark.skipif(
    cgroups.unavailable() is not None, reason=f"cgroups: {cgroups.unavailable()}"
)


@pytest.mark.parametrize(
    ("cpus", "memory_mib", "precision"), [(0.5, 512, "int4"), (1.5, 3072, "int4"), (2, 9216, None)]
)
def test_info_reads_the_cgroup_it_runs_in(
    cpus: float, memory_mib: int, precision: str | None
) -> None:
    with cgroups.Limits(cpus, memory_mib << 20, name="fp") as box:
        out = subprocess.run(
            box.wrap([sys.executable, "-m", "edgemesh", "info", "--json"]),
            capture_output=True,
            text=True,
            check=True,
        )
    info = json.loads(out.stdout)
    assert info["cgroup"]["cpu_quota_cores"] == pytest.approx(cpus)
    assert info["cgroup"]["path"].endswith(box.name)
    assert info["cpu"]["cores_effective"] == pytest.approx(min(cpus, len(os.sched_getaffinity(0))))
    if precision:  # under 4 GiB a box gets int4 whatever its CPU (docs/FINGERPRINT.md)
        assert info["precision"] == precision
    assert info["memory"]["limit_bytes"] == memory_mib << 20
    assert info["memory"]["total_bytes"] > info["memory"]["limit_bytes"]


def test_the_cgroup_is_gone_and_its_processes_killed() -> None:
    with cgroups.Limits(1.0, None, name="gone") as box:
        proc = subprocess.Popen(box.wrap(["sleep", "60"]))
        for _ in range(100):
            if proc.pid in box.pids():
                break
            subprocess.run(["sleep", "0.02"])
        assert proc.pid in box.pids()
    assert proc.wait(timeout=5) != 0
    assert not any(d.exists() for d in box.dirs)


@pytest.mark.netns
def test_a_namespace_box_fingerprints_its_cgroup_limits() -> None:
    """The multi-box tests' boxes must look like the weaker boxes they emulate."""
    from edgemesh.lab.netns import NetnsLab, skip_reason

    if skip_reason():
        pytest.skip(skip_reason())
    with NetnsLab(1, subnet="10.76.0", prefix="emf", cpus=0.5, memory_bytes=768 << 20) as lab:
        out = lab.boxes[0].run([sys.executable, "-m", "edgemesh", "info", "--json"], check=True)
    info = json.loads(out.stdout)
    assert info["cpu"]["cores_effective"] == pytest.approx(0.5)
    assert info["memory"]["limit_bytes"] == 768 << 20
