"""deploy/: the one-line installer's hardware decisions, a real install into a
fresh virtualenv, and compose files that only use commands the CLI accepts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
SYSROOTS = ROOT / "tests" / "data" / "sysroots"


def _dry_run(sysroot: Path) -> dict[str, str]:
    out = subprocess.run(
        ["sh", str(INSTALL), "--dry-run"],
        env={**os.environ, "EDGEMESH_SYSROOT": str(sysroot)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


@pytest.mark.parametrize(
    ("board", "arch", "extra", "absent"),
    [
        ("rpi5", "aarch64", None, ("openvino", "rknn", "tensorrt")),
        ("rock5b-rk3588", "aarch64", "rknn", ("openvino", "tensorrt")),
        ("jetson-agx-orin", "aarch64", None, ("tensorrt", "rknn")),  # TensorRT from JetPack
        ("nuc12-i7", "x86_64", "openvino", ("rknn", "tensorrt")),
        ("server-epyc-a10", "x86_64", "tensorrt", ("openvino", "rknn")),
    ],
)
def test_installer_picks_extras_for_the_board(
    board: str, arch: str, extra: str | None, absent: tuple[str, ...]
) -> None:
    facts = {k.strip(): v.strip() for k, v in _dry_run(SYSROOTS / board).items()}
    extras = facts["extras"].split(",")
    assert facts["arch"] == arch
    assert {"llamacpp", "demo", "onnx", "mesh"} <= set(extras)
    if extra:
        assert extra in extras
    assert not set(absent) & set(extras)


def test_installer_rejects_unknown_options() -> None:
    run = subprocess.run(["sh", str(INSTALL), "--frobnicate"], capture_output=True, text=True)
    assert run.returncode != 0 and "unknown option '--frobnicate'" in run.stderr


@pytest.mark.slow
def test_installer_installs_a_working_command(tmp_path: Path) -> None:
    """A real install of the core package from this checkout into a new venv."""
    env = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(
        [
            "sh", str(INSTALL), "--source", str(ROOT), "--extras", "none",
            "--prefix", str(tmp_path / "prefix"), "--bin-dir", str(tmp_path / "bin"),
        ],
        env=env, check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    edgemesh = tmp_path / "bin" / "edgemesh"
    assert edgemesh.is_symlink()
    info = subprocess.run(
        [str(edgemesh), "info", "--json"], capture_output=True, text=True, check=True
    )
    assert '"arch"' in info.stdout


def _compose_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted((ROOT / "deploy" / "compose").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for name, service in doc["services"].items():
            found.append((f"{path.name}:{name}", service["command"]))
    return found


@pytest.mark.parametrize(("where", "argv"), _compose_commands(), ids=lambda v: str(v)[:40])
def test_compose_commands_parse(where: str, argv: list[str]) -> None:
    from edgemesh.cli import app

    # --help after the real arguments: click rejects unknown options before it prints help.
    result = CliRunner().invoke(
        app, [a.replace("${EDGEMESH_MESH:-home}", "home") for a in argv] + ["--help"]
    )
    assert result.exit_code == 0, f"{where}: {argv}\n{result.output}"


def test_compose_files_build_from_existing_dockerfiles() -> None:
    for path in (ROOT / "deploy" / "compose").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        for service in doc["services"].values():
            build = service.get("build")
            if build:
                context = (path.parent / build["context"]).resolve()
                assert (context / build["dockerfile"]).is_file(), path
