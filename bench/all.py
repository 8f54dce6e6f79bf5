"""Every benchmark in one run, then docs/BENCHMARKS.md.

``edgemesh bench all`` / ``python -m edgemesh.bench``. Each benchmark runs as
its own subprocess (its own cores, memory and failures); one that cannot run
here (no root for namespaces, a missing extra) is reported with the reason and
the page says which figure is missing, instead of the whole run failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgemesh.bench import report
from edgemesh.reexec import module_argv


def _needs_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (network namespaces, cgroups)"


def steps(package: Path) -> list[tuple[str, list[str], str | None]]:
    """(name, argv after ``python -m``, why it cannot run or None)."""
    pkg = str(package)
    root = _needs_root()
    return [
        ("single", ["edgemesh", "bench", "single", "--package", pkg], None),
        ("throughput", ["edgemesh", "bench", "throughput", "--package", pkg], None),
        ("pipeline", ["edgemesh.bench.pipeline", "--model", pkg], None),
        ("planner_check", ["edgemesh.bench.planner_check", "--model", pkg], root),
        ("llamacpp_rpc", ["edgemesh.bench.llamacpp_rpc", "--package", pkg], None),
        ("mesh", ["edgemesh.bench.mesh", "--package", pkg], root),
        ("memory", ["edgemesh.bench.memory", "--package", pkg], root),
        ("vision", ["edgemesh.bench.vision"], None),  # graph models; needs no package
        ("gateway", ["edgemesh", "bench", "gateway"], None),  # default GGUF; needs no package
    ]


def run(only: list[str] | None = None, package: Path | None = None) -> dict[str, Any]:
    from edgemesh import models

    package = package or models.default_package()
    outcome: dict[str, Any] = {}
    for name, argv, why in steps(package):
        if only and name not in only:
            continue
        if why:
            outcome[name] = {"skipped": why}
            print(f"[bench] {name}: skipped ({why})", flush=True)
            continue
        print(f"[bench] {name}: python -m {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(module_argv(*argv), check=False)
        outcome[name] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0)}
        if proc.returncode != 0:
            print(f"[bench] {name} failed with exit code {proc.returncode}", flush=True)
    page = report.render()
    print(f"[bench] wrote {page}", flush=True)
    return outcome


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="run only these benchmarks")
    parser.add_argument("--package", type=Path, help="converted default-model package")
    args = parser.parse_args(argv)
    outcome = run(args.only, args.package)
    print(json.dumps(outcome, indent=2))
    if any(v.get("returncode") for v in outcome.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
