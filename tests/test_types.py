"""The type-checker gate: mypy over the packages pyproject's [tool.mypy] names.

CI runs only `python -m pytest`, so the checker runs here, as a subprocess
with the project's own config. pyproject's package-dir maps top-level
folders into the one namespace (mesh/ is edgemesh.mesh, sharding/ is
edgemesh.sharding, ...) and the editable install does that with an import
hook, which mypy does not run. So the test builds a tree of symlinks laid
out the way the installed package is (edgemesh/mesh -> mesh/, ...) and runs
mypy from there; error paths are mapped back to the repository's folders.

Run by hand: `python tests/test_types.py` prints mypy's report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mypy itself depends on tomli there
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# Cold, the checked packages and what they import (numpy, fastapi, torch ...)
# take about 80 s of CPU; on a loaded 2-core machine that was 390 s of wall.
MYPY_TIMEOUT_S = 1100


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def package_dirs() -> dict[str, Path]:
    """Package name -> the folder it installs from (pyproject's package-dir)."""
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def folder_of(package: str, mapping: dict[str, Path]) -> Path:
    """The folder holding `package`, through the longest mapped parent."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        parent = ".".join(parts[:cut])
        if parent in mapping:
            return mapping[parent].joinpath(*parts[cut:])
    raise AssertionError(f"{package} is under no package-dir entry of {PYPROJECT}")


def build_tree(tree: Path, mapping: dict[str, Path]) -> None:
    """Lay out `mapping` under `tree` as the installed namespace is laid out.

    A mapped package with mapped packages below it (edgemesh, holding
    edgemesh.mesh ...) becomes a real folder of links to its entries, so the
    nested ones can sit beside them; every other one is one folder link.
    """
    names = sorted(mapping, key=lambda n: n.count("."))
    for name in names:
        place = tree.joinpath(*name.split("."))
        nested = [n for n in names if n.startswith(name + ".")]
        if not nested:
            place.parent.mkdir(parents=True, exist_ok=True)
            place.symlink_to(mapping[name], target_is_directory=True)
            continue
        place.mkdir(parents=True, exist_ok=True)
        taken = {n.split(".")[name.count(".") + 1] for n in nested}
        for entry in mapping[name].iterdir():
            if entry.name == "__pycache__" or entry.name in taken:
                continue
            (place / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


def to_repo_path(line: str, mapping: dict[str, Path]) -> str:
    """Rewrite a tree path at the start of a mypy line to the repository's path."""
    for name in sorted(mapping, key=lambda n: -n.count(".")):
        prefix = name.replace(".", "/") + "/"
        if line.startswith(prefix):
            folder = mapping[name].relative_to(ROOT).as_posix()
            return folder + "/" + line[len(prefix) :]
    return line


def run_mypy(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        import mypy  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail("mypy is not installed: pip install -e '.[dev]' (the dev extra pins it)")
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    command = [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT)]
    command += ["--cache-dir", str(tree / ".mypy_cache"), *args]
    return subprocess.run(
        command, cwd=tree, env=env, capture_output=True, text=True, timeout=MYPY_TIMEOUT_S
    )


def report(result: subprocess.CompletedProcess[str], mapping: dict[str, Path]) -> str:
    lines = (result.stdout + result.stderr).splitlines()
    return "\n".join(to_repo_path(line, mapping) for line in lines)


def expected_sources(packages: list[str], mapping: dict[str, Path]) -> int:
    """How many .py files the configured packages hold: what mypy must check."""
    files: set[Path] = set()
    for package in packages:
        folder = folder_of(package, mapping)
        assert (folder / "__init__.py").is_file(), f"[tool.mypy] names {package}: no {folder}"
        files.update(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    return len(files)


@pytest.mark.timeout(MYPY_TIMEOUT_S + 100)
def test_configured_packages_type_check(tmp_path: Path) -> None:
    mapping = package_dirs()
    packages = _pyproject()["tool"]["mypy"]["packages"]
    build_tree(tmp_path, mapping)
    result = run_mypy(tmp_path)
    text = report(result, mapping)
    assert result.returncode == 0, f"mypy found errors (rc {result.returncode}):\n{text}"
    # A package the tree failed to lay out would be checked as nothing at all.
    # (mypy also counts a data folder without __init__.py as a namespace package.)
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked, text
    assert int(checked.group(1)) >= expected_sources(packages, mapping), text
    assert not result.stderr.strip(), text


# One function without annotations that also mis-adds: strict modules must
# refuse the missing annotations, the others must still check the body.
PROBE = 'def probe(n):\n    text: str = "a"\n    return text + 1\n'


def test_strict_where_configured(tmp_path: Path) -> None:
    for package in (
        "edgemesh",
        "edgemesh.router",
        "edgemesh.sharding",
        "edgemesh.sharding.planner",
    ):
        folder = tmp_path.joinpath(*package.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    (tmp_path / "edgemesh/router/probe.py").write_text(PROBE)
    (tmp_path / "edgemesh/sharding/planner/probe.py").write_text(PROBE)
    result = run_mypy(
        tmp_path, "-m", "edgemesh.router.probe", "-m", "edgemesh.sharding.planner.probe"
    )
    errors = {
        (m.group(1), m.group(2))
        for m in re.finditer(
            r"^edgemesh/(\S+)/probe\.py:\d+: error: .*\[([a-z-]+)\]$", result.stdout, re.M
        )
    }
    assert errors == {
        ("router", "operator"),
        ("sharding/planner", "operator"),
        ("sharding/planner", "no-untyped-def"),
    }, result.stdout + result.stderr


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        dirs = package_dirs()
        build_tree(Path(scratch), dirs)
        done = run_mypy(Path(scratch))
        print(report(done, dirs))
        sys.exit(done.returncode)
