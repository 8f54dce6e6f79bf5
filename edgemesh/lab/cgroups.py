"""Emulate a weaker box on this host: a cgroup with a CPU quota and a memory limit.

Benchmarks and tests start a "Pi-sized" process by wrapping its command line
(``Limits.wrap(argv)``): a shell joins the cgroup, then execs the command, so
everything it starts inherits the limits and the fingerprint reads them from
``/proc/self/cgroup`` exactly as on a real container. Works with cgroup v2
(unified) and v1 (separate ``cpu`` and ``memory`` hierarchies); needs root.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from edgemesh.errors import ConfigError

ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


def own_group(controller: str) -> str:
    """This process's group path in the hierarchy of ``controller`` ("" = v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            return path
    return "/"


def unavailable() -> str | None:
    """None when cgroups can be created here, else why not."""
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    if (ROOT / "cgroup.controllers").exists():
        if not {"cpu", "memory"} <= set((ROOT / "cgroup.controllers").read_text().split()):
            return "the cgroup v2 root lacks the cpu or memory controller"
        return None
    if (ROOT / "cpu").is_dir() and (ROOT / "memory").is_dir():
        return None
    return f"no cgroup v1 or v2 hierarchy with cpu and memory under {ROOT}"


class Limits:
    """A cgroup limiting CPU to ``cpus`` cores and memory to ``memory_bytes``.

    Use as a context manager; on exit every process still inside is killed
    and the cgroup removed, so nothing outlives a failing test.
    """

    def __init__(self, cpus: float | None, memory_bytes: int | None, name: str = "") -> None:
        if cpus is not None and cpus <= 0:
            raise ConfigError(f"a CPU quota must be positive, got {cpus}")
        why = unavailable()
        if why:
            raise ConfigError(f"cannot emulate a box with cgroups: {why}")
        self.cpus = cpus
        self.memory_bytes = memory_bytes
        self.name = f"edgemesh-{name or 'box'}-{uuid.uuid4().hex[:6]}"
        self.v2 = (ROOT / "cgroup.controllers").exists()
        self.dirs: list[Path] = []

    def __enter__(self) -> Limits:
        return self.create()

    def create(self) -> Limits:
        """Make the group and set its limits (``remove`` undoes it)."""
        # Groups nest under this process's own group, so an emulated box can never
        # get more than the caller has (and v2 containers only allow that anyway).
        if self.v2:
            parent = ROOT / own_group("").lstrip("/")
            self._enable_v2_controllers(parent)
            path = parent / self.name
            path.mkdir()
            self.dirs = [path]
            if self.cpus is not None:
                (path / "cpu.max").write_text(f"{round(self.cpus * _PERIOD_US)} {_PERIOD_US}")
            if self.memory_bytes is not None:
                (path / "memory.max").write_text(str(self.memory_bytes))
                (path / "memory.swap.max").write_text("0")
        else:
            cpu = ROOT / "cpu" / own_group("cpu").lstrip("/") / self.name
            mem = ROOT / "memory" / own_group("memory").lstrip("/") / self.name
            cpu.mkdir()
            mem.mkdir()
            self.dirs = [cpu, mem]
            if self.cpus is not None:
                (cpu / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(round(self.cpus * _PERIOD_US)))
            if self.memory_bytes is not None:
                (mem / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
        return self

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this cgroup (a shell joins it, then execs)."""
        joins = "; ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["sh", "-c", f'{joins}; exec "$@"', "sh", *argv]

    def enter(self) -> None:
        """Move the calling process into the group (e.g. from a ``preexec_fn``)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        return found

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Kill whatever is still inside, then delete the group."""
        deadline = time.monotonic() + 10
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # members still exiting
                    time.sleep(0.1)

    @staticmethod
    def _enable_v2_controllers(parent: Path) -> None:
        control = parent / "cgroup.subtree_control"
        enabled = set(control.read_text().split())
        for controller in ("cpu", "memory"):
            if controller not in enabled:
                try:
                    control.write_text(f"+{controller}")
                except OSError as exc:
                    # A group that holds processes cannot delegate (v2's
                    # no-internal-processes rule): say what to do instead.
                    raise ConfigError(
                        f"cannot enable the {controller} controller in {parent}: {exc}",
                        hint="run from a cgroup whose controllers are delegated",
                    ) from exc
