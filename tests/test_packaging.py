"""The package installs under one `edgemesh` namespace, editable or as a wheel,
and `import edgemesh` stays free of heavy runtimes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = [
    "onnxruntime",
    "openvino",
    "tensorrt",
    "rknnlite",
    "llama_cpp",
    "ray",
    "torch",
    "transformers",
    "zeroconf",
]


def _run(code: str, *, path: Path | None = None) -> str:
    prelude = f"import sys; sys.path.insert(0, {str(path)!r});" if path else ""
    out = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, check=True, cwd="/"
    )
    return out.stdout


def test_import_edgemesh_imports_no_heavy_runtime() -> None:
    code = (
        "import sys, json, edgemesh, edgemesh.cli, edgemesh.backends.registry as r, "
        "edgemesh.gateway, edgemesh.engine; r.names();"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    assert json.loads(_run(code)) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the
    # sources, and a test must not leave files in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("edgemesh", "mesh", "sharding", "backends", "bench"):
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return next(out.glob("edgemesh-*.whl"))


def test_wheel_holds_only_the_edgemesh_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("edgemesh-")}
    assert top == {"edgemesh"}
    for module in (
        "edgemesh/mesh/__init__.py",
        "edgemesh/sharding/manifest.py",
        "edgemesh/backends/llamacpp.py",
        "edgemesh/gateway/app.py",
        "edgemesh/bench/single.py",
        "edgemesh/cli/serve.py",
    ):
        assert module in names


def test_non_editable_install_works(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import edgemesh, edgemesh.backends.registry as r, json;"
        "from typer.testing import CliRunner; from edgemesh.cli import app;"
        "res = CliRunner().invoke(app, ['--help']);"
        "print(json.dumps([edgemesh.__file__, r.names(), res.exit_code]))"
    )
    where, names, code_ = json.loads(_run(code, path=target))
    assert where.startswith(str(target))
    assert "llamacpp" in names and code_ == 0
    assert not (target / "mesh").exists() and not (target / "backends").exists()
