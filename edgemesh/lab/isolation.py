"""Running a bench's pieces apart: a worker subprocess per measurement, and a
throw-away local Ray node whose box resources stand in for boxes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgemesh.reexec import module_argv


def run_worker(module: str, job: dict[str, Any], label: str) -> dict[str, Any]:
    """``python -m MODULE --worker JOB``: one measurement in a fresh process (no
    allocator or thread-pool state carried over), whose last stdout line is its
    JSON result. Raises RuntimeError with the worker's stderr when it fails."""
    cmd = module_argv(module, "--worker", json.dumps(job))
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {label} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    # Other processes on the box skew a run: keep the 1-minute load around it.
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


@contextmanager
def local_ray(boxes: Sequence[str], prefix: str) -> Iterator[tuple[Any, Path]]:
    """A 2-CPU Ray node on this host with a ``box:<id>`` resource per box; yields
    (ray, a temporary folder for stage caches). Ray's session folder lives in
    that folder too, and both go away with the node."""
    from edgemesh.errors import require

    ray = require("ray", "mesh")
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        ray.init(
            num_cpus=2,
            resources={f"box:{b}": 1.0 for b in boxes},
            include_dashboard=False,
            _temp_dir=str(tmp / "ray"),
            logging_level="warning",
        )
        try:
            yield ray, tmp
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
