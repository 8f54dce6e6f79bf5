"""`edgemesh info` as a user runs it: on snapshots, on this machine, and
inside a real cgroup with CPU and memory limits."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from tests.test_fingerprint import EXPECTED, SYSROOTS

runner = CliRunner()
MIB = 1024 * 1024


def info_json(*args: str) -> dict:
    result = runner.invoke(app, ["info", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_info_json_on_snapshots(name: str) -> None:
    want = EXPECTED[name]
    d = info_json("--sysroot", str(SYSROOTS / name))
    assert (d["id"], d["arch"], d["board"]) == (want["id"], want["arch"], want["board"])
    assert d["cpu"]["cores_effective"] == want["cores_effective"]
    assert isinstance(d["cpu"]["cores_online"], int)
    assert d["memory"]["limit_bytes"] == want["limit_bytes"]
    assert [a["kind"] for a in d["accelerators"]] == [k for k, _ in want["accelerators"]]
    assert d["backends"] == want["backends"]
    assert set(d["installed"]) <= set(d["backends"])
    assert d["precision"] == want["precision"]


def test_info_readable_summary() -> None:
    result = runner.invoke(app, ["info", "--sysroot", str(SYSROOTS / "rock5b-rk3588")])
    assert result.exit_code == 0, result.output
    assert "Radxa ROCK 5 Model B" in result.output
    assert "rockchip-npu: RK3588 NPU" in result.output
    assert "rknn, llamacpp, onnxruntime" in result.output
    assert "precision   int8" in result.output
    assert not result.output.lstrip().startswith("{")


def test_info_id_override() -> None:
    assert info_json("--sysroot", str(SYSROOTS / "rpi5"), "--id", "shelf-2")["id"] == "shelf-2"


def test_info_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", "--sysroot", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output and "cpuinfo" in result.output
    result = runner.invoke(app, ["info", "--sysroot", str(SYSROOTS / "rpi5"), "--measure"])
    assert result.exit_code == 1
    assert "snapshot" in result.output


def test_info_on_this_machine() -> None:
    d = info_json()
    assert d["arch"] == platform.machine()
    if d["arch"] == "x86_64":
        assert d["cpu"]["vendor"] in ("GenuineIntel", "AuthenticAMD")
        assert "avx2" in d["cpu"]["features"]  # every x86 box this project targets has it
    cpu, mem = d["cpu"], d["memory"]
    assert 0 < cpu["cores_effective"] <= cpu["cores_online"] <= (os.cpu_count() or 1)
    assert cpu["cores_effective"] <= len(os.sched_getaffinity(0))
    assert 0 < mem["available_bytes"] <= mem["limit_bytes"] <= mem["total_bytes"]
    assert d["backends"][-1] == "onnxruntime"
    assert ("openvino" in d["backends"]) == (cpu["vendor"] == "GenuineIntel")
    assert len(d["digest"]) == 16


# ------------------------------------------------------------ a real cgroup


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _v2_cgroup(name: str, quota_us: int, memory: int) -> tuple[list[Path], list[Path]] | str:
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if not controllers.exists():
        return "no cgroup v2 hierarchy mounted at /sys/fs/cgroup"
    if not {"cpu", "memory"} <= set((root / "cgroup.subtree_control").read_text().split()):
        return "cgroup v2 has cpu/memory controllers off in the root's subtree_control"
    folder = root / name
    folder.mkdir()
    try:
        _write(folder / "cpu.max", f"{quota_us} 100000")
        _write(folder / "memory.max", str(memory))
    except OSError:
        folder.rmdir()
        raise
    return [folder], [folder / "cgroup.procs"]


def _v1_cgroup(name: str, quota_us: int, memory: int) -> tuple[list[Path], list[Path]] | str:
    cpu = next(
        (p for p in map(Path, ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")) if p.is_dir()),
        None,
    )
    mem = Path("/sys/fs/cgroup/memory")
    if cpu is None or not mem.is_dir():
        return "no cgroup v1 cpu and memory hierarchies under /sys/fs/cgroup"
    made: list[Path] = []
    try:
        for parent in (cpu, mem):
            (parent / name).mkdir()
            made.append(parent / name)
        _write(cpu / name / "cpu.cfs_period_us", "100000")
        _write(cpu / name / "cpu.cfs_quota_us", str(quota_us))
        _write(mem / name / "memory.limit_in_bytes", str(memory))
    except OSError:
        for folder in reversed(made):
            folder.rmdir()
        raise
    return made, [folder / "cgroup.procs" for folder in made]


@pytest.fixture
def limited_cgroup() -> Iterator[list[Path]]:
    """A child cgroup with 0.5 CPU and 512 MiB; yields the cgroup.procs files
    a process must join. Removed afterwards, also when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    name = f"edgemesh-test-{os.getpid()}"
    reasons = []
    for make in (_v2_cgroup, _v1_cgroup):
        try:
            made = make(name, 50000, 512 * MIB)
        except OSError as exc:
            reasons.append(f"{make.__name__}: cgroup fs not writable ({exc})")
            continue
        if isinstance(made, str):
            reasons.append(made)
            continue
        folders, procs = made
        try:
            yield procs
        finally:
            for folder in reversed(folders):
                folder.rmdir()  # empty once the child process has exited
        return
    pytest.skip("; ".join(reasons))


def test_info_reads_the_limits_of_its_own_cgroup(limited_cgroup: list[Path]) -> None:
    # The shell joins the cgroup(s), then becomes `edgemesh info --json`.
    script = 'for f in "$@"; do echo $$ > "$f"; done; exec "$0" -m edgemesh.cli info --json'
    proc = subprocess.run(
        ["sh", "-c", script, sys.executable, *map(str, limited_cgroup)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["cgroup"]["cpu_quota_cores"] == 0.5
    assert d["cpu"]["cores_effective"] == 0.5
    assert d["memory"]["limit_bytes"] == 512 * MIB
    assert d["memory"]["available_bytes"] < 512 * MIB
    assert d["precision"] == "int4"  # memory-poor
    assert d["cgroup"]["path"].endswith(f"edgemesh-test-{os.getpid()}")
