"""`edgemesh info` as a user runs it: on snapshots, on this machine, and
inside a real cgroup with CPU and memory limits."""

from __future__ import annotations

import json
import os
import platform
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
