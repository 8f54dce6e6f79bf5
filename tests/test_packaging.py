"""The package installs under one `edgemesh` namespace, editable or as a wheel,
and `import edgemesh` stays free of heavy runtimes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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
    # Every package folder of the checkout ships (pyproject lists them by hand).
    for folder, prefix in (("edgemesh", "edgemesh"), ("mesh", "edgemesh/mesh"),
                           ("sharding", "edgemesh/sharding"), ("backends", "edgemesh/backends"),
                           ("bench", "edgemesh/bench")):  # fmt: skip
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            if folder == "edgemesh" and rel.split("/")[0] in ("mesh", "sharding", "backends"):
                continue
            assert f"{prefix}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    for module in (
        "edgemesh/mesh/__init__.py",
        "edgemesh/sharding/package/manifest.py",
        "edgemesh/sharding/convert/data/perplexity.txt",
        "edgemesh/sdk/client.py",
        "edgemesh/backends/llamacpp.py",
        "edgemesh/gateway/app.py",
        "edgemesh/lab/netns.py",
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


# Re-running edgemesh in a child process (join --detach, the head's restore,
# the benchmarks) from a clone's root, where `python -m edgemesh` would pick
# the checkout's edgemesh/ before the installed package.


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (non-editable) into its own site folder."""
    target = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return target


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone's root: the repository's own folders, not installed."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    for name in ("edgemesh", "mesh", "sharding", "backends", "bench"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _from_install(installed: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run CODE as the installed `edgemesh` console script would: its own
    folder first on sys.path, the caller's folder not at all."""
    prelude = f"import sys; sys.path[0] = {str(installed)!r};"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=cwd,
        timeout=120,
    )  # fmt: skip


def test_reexec_from_a_clone_root_runs_the_installed_package(installed: Path, clone: Path) -> None:
    code = (
        "import json, subprocess; from edgemesh import reexec;"
        "probe = 'import edgemesh.backends.registry as r, json; print(json.dumps(r.__file__))';"
        "argvs = [reexec.python_argv(probe), reexec.edgemesh_argv('--help'),"
        " reexec.module_argv('edgemesh', '--help')];"
        "outs = [subprocess.run(a, capture_output=True, text=True) for a in argvs];"
        "print(json.dumps([[o.returncode, o.stdout, o.stderr] for o in outs]))"
    )
    out = _from_install(installed, code, cwd=clone)
    assert out.returncode == 0, out.stderr
    (rc, probe, err), (rc_cli, help_cli, _), (rc_mod, help_mod, _) = json.loads(out.stdout)
    assert rc == 0, err
    assert json.loads(probe).startswith(str(installed))  # not the clone's backends/
    assert rc_cli == 0 and "Usage: edgemesh" in help_cli and "join" in help_cli
    assert rc_mod == 0 and "join" in help_mod
    # What the old argv did from the same folder: the checkout, not the install.
    old = subprocess.run(
        [sys.executable, "-m", "edgemesh.backends.registry"], capture_output=True, text=True,
        cwd=clone, env={**os.environ, "PYTHONPATH": str(installed)}, timeout=120,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    probe_old = subprocess.run(
        [sys.executable, "-c", "import edgemesh; print(edgemesh.__file__)"], capture_output=True,
        text=True, cwd=clone, env={**os.environ, "PYTHONPATH": str(installed)}, timeout=120,
    )  # fmt: skip
    assert probe_old.stdout.strip().startswith(str(clone))


def test_python_m_edgemesh_runs_in_a_clone_root(clone: Path) -> None:
    """A clone run in place finds its backends/, mesh/, sharding/ and bench/."""
    code = (
        "import json, edgemesh, edgemesh.backends.registry as r, edgemesh.mesh, "
        "edgemesh.sharding.package.manifest, edgemesh.bench, edgemesh.lab;"
        "print(json.dumps([edgemesh.__file__, r.__file__, "
        "edgemesh.sharding.package.manifest.__file__, edgemesh.lab.__file__]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=clone, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for where in json.loads(out.stdout):
        assert where.startswith(str(clone))
    cli = subprocess.run(
        [sys.executable, "-m", "edgemesh", "--help"], capture_output=True, text=True, cwd=clone,
        timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0 and "join" in cli.stdout


def test_join_detach_from_a_clone_root_keeps_running(
    installed: Path, clone: Path, tmp_path: Path
) -> None:
    pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
    state = tmp_path / "state"
    mesh = f"t{os.getpid()}{int(time.time()) % 100000}"
    argv = ["join", "--mesh", mesh, "--state-dir", str(state), "--box-id", "box-d",
            "--interface", "127.0.0.1", "--settle", "1", "--no-ray", "--detach"]  # fmt: skip
    code = f"import sys; sys.argv = ['edgemesh', *{argv!r}]; from edgemesh.cli import main; main()"
    out = _from_install(installed, code, cwd=clone)
    assert out.returncode == 0, out.stderr
    match = re.search(r"pid (\d+)", out.stdout)
    assert match, out.stdout
    pid = int(match.group(1))
    try:
        status = [*_status_argv(installed), "--json", "--state-dir", str(state)]
        deadline, doc = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            res = subprocess.run(status, capture_output=True, text=True, cwd=clone, timeout=60)
            if res.returncode == 0 and json.loads(res.stdout)["role"] == "head":
                doc = json.loads(res.stdout)
                break
            time.sleep(0.5)
        log = (state / "agent.log").read_text() if (state / "agent.log").exists() else ""
        assert doc is not None, f"the detached join never led its mesh; agent.log:\n{log}"
        assert doc["head"] == "box-d" and "Traceback" not in log
    finally:
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.2)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _status_argv(installed: Path) -> list[str]:
    prelude = f"import sys; sys.path[0] = {str(installed)!r}; sys.argv[0] = 'edgemesh';"
    return [sys.executable, "-c", prelude + "from edgemesh.cli import main; main()", "status"]
