"""What the mesh gateway asks each box, with Ray tasks pinned to it.

A task with a ``box:<id>`` resource of 0.001 and no CPU runs on that box
(its own sysfs, its own files, its agent), so nothing here is read on the
head and attributed to another box.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.errors import ModelNotFoundError, NotFoundError, UnsupportedModelError
from edgemesh.gateway.manager import this_box_live

log = logging.getLogger(__name__)

LIVE_PERIOD_S = 2.0
LIVE_TIMEOUT_S = 3.0
STALE_S = 15.0
STOP_DELAY_S = 1.0


def find_packages_here(extra: list[str]) -> list[dict[str, Any]]:
    from edgemesh.gateway.packages import find_packages

    return find_packages(p for p in extra if p and Path(p).is_dir())


def package_kind(path: str) -> str | None:
    """On a box: "llm", "graph" or None for the folder at ``path``."""
    from edgemesh.gateway.packages import describe

    info = describe(Path(path))
    return None if info is None else str(info["kind"])


def read_graph_manifest(path: str) -> bytes:
    """On a box: a graph package's ``graph.json`` bytes."""
    manifest = Path(path) / "graph.json"
    try:
        return manifest.read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(f"no graph manifest at {manifest}: {exc}") from exc


def read_manifest(path: str) -> bytes:
    manifest = Path(path) / "manifest.json"
    if not manifest.exists() and (Path(path) / "graph.json").exists():
        raise UnsupportedModelError(
            f"'{path}' is a graph (vision) package: it has no layers to plan",
            hint="deploy it without a plan; it runs whole on each box that serves it",
        )
    try:
        return manifest.read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(f"no package manifest at {manifest}: {exc}") from exc


def stop_agent() -> str:
    """On a box: ask its ``edgemesh join`` to leave (SIGTERM, it says goodbye)."""
    import signal

    from edgemesh.mesh.status import read_agent_state

    folder = paths.agent_state_dir()
    doc = read_agent_state(folder) if folder else None
    if doc is None:
        raise NotFoundError(
            "this box's agent state was not found (EDGEMESH_STATE_DIR unset or stale)",
            code="box_not_found",
        )
    pid = int(doc["pid"])
    # Signalled a moment later, so this reply leaves the box before the
    # agent stops the box's Ray node (and this worker with it).
    threading.Timer(STOP_DELAY_S, os.kill, (pid, signal.SIGTERM)).start()
    return f"asked the agent (pid {pid}) to leave"


class LivePoller(threading.Thread):
    """Every alive box's readings (``this_box_live``), refreshed every
    ``LIVE_PERIOD_S`` in the background so a page load never waits on a box."""

    def __init__(self, ray: Any) -> None:
        super().__init__(name="edgemesh-live", daemon=True)
        self._ray = ray
        self._readings: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def readings(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._readings)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        """Ask every alive box for its readings; a box keeps at most one call
        in flight (a slow box, e.g. starting its first Ray worker, is never
        cancelled and asked again), and its last reading stays until a new
        one comes, flagged once it is ``STALE_S`` old."""
        from edgemesh.router.profiles import mesh_boxes

        task = self._ray.remote(this_box_live)
        pending: dict[str, tuple[Any, float]] = {}
        while not self._halt.wait(LIVE_PERIOD_S):
            try:
                alive = {b.id for b in mesh_boxes(self._ray)}
                now = time.monotonic()
                for box in alive - set(pending):
                    ref = task.options(resources={f"box:{box}": 0.001}, num_cpus=0).remote()
                    pending[box] = (ref, now)
                for box in set(pending) - alive:
                    del pending[box]  # gone: its call fails or never ends
                refs = [ref for ref, _ in pending.values()]
                ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=LIVE_TIMEOUT_S)
                done = {r.hex() for r in ready}
                with self._lock:
                    for box in list(self._readings):
                        if box not in alive:
                            del self._readings[box]
                    for box, (ref, since) in list(pending.items()):
                        if ref.hex() in done:
                            del pending[box]
                            try:
                                self._readings[box] = self._ray.get(ref)
                            except Exception as exc:  # the box went away mid-call
                                self._readings[box] = {"error": f"{type(exc).__name__}: {exc}"}
                        elif now - since > STALE_S:
                            got = dict(self._readings.get(box, {}))
                            got["error"] = f"no answer for {now - since:.0f} s"
                            self._readings[box] = got
            except Exception:  # keep polling; the page shows the last readings
                log.exception("live readings of the boxes failed")
