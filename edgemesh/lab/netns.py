"""Network-namespace "boxes" for multi-box tests on one host.

A ``NetnsLab`` builds N boxes, each a network namespace with a veth pair
whose other end sits in a bridge the lab creates, an address ``<subnet>.N/24``
and loopback up. Commands run inside a box as their own process group (so a
test can SIGKILL a whole box process tree, like pulling its plug), with
optional cgroup CPU/memory limits. Only the lab's private /24 and loopback
carry traffic: the bridge has no address on the host unless asked for, and
the boxes have no default route.

Cleanup is thorough on purpose, because a leaked Ray node or namespace would
eat the memory of a machine shared with other engineers: ``close()`` kills
every process group the lab started, then every process still living in a
box's namespace (``ip netns pids``), then removes namespaces, links and
cgroups. Use it as a context manager or through the ``netns_lab`` fixture.

Usage::

    with NetnsLab(3) as lab:
        proc = lab.boxes[0].spawn(["edgemesh", "join"], env=lab.boxes[0].env())
        out = lab.boxes[1].run(["edgemesh", "status", "--json"])
        lab.boxes[0].kill(proc)            # SIGKILL the process group
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgemesh.lab.cgroups import Limits

_counter = itertools.count()


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace boxes need root"
    if shutil.which("ip") is None:
        return "network-namespace boxes need `ip` (apt-get install iproute2)"
    probe = f"emtprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Box:
    """One namespace box: its name, address and private folder."""

    name: str
    index: int
    address: str
    iface: str
    dir: Path
    cgroup: Limits | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment with this box's own HOME and TMPDIR, so nothing a
        program writes by default lands where another box writes."""
        home = self.dir / "home"
        tmp = self.dir / "tmp"
        home.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update({"HOME": str(home), "TMPDIR": str(tmp)})
        if extra:
            env.update(extra)
        return env

    def _argv(self, argv: Sequence[str]) -> list[str]:
        # nsenter, not `ip netns exec`: the latter mounts a fresh /sys for the
        # namespace, which hides /sys/fs/cgroup, so a box's fingerprint would
        # see the host's CPUs and memory instead of its cgroup limits.
        netns = f"/var/run/netns/{self.name}"
        return ["nsenter", f"--net={netns}", "--", *[str(a) for a in argv]]

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: the new session makes the
        # child a process-group leader so kill() reaches its whole tree.
        os.setsid()
        if self.cgroup is not None:
            self.cgroup.enter()

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the box as its own process group; output goes
        to ``log`` (default ``<box dir>/<n>.log``)."""
        log = log or self.dir / f"proc{len(self.procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self._argv(argv),
                env=dict(env) if env is not None else self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                preexec_fn=self._preexec,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the box to completion (own process group,
        killed with its children on timeout)."""
        proc = subprocess.Popen(
            self._argv(argv),
            env=dict(env) if env is not None else self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=self._preexec,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise
        finally:
            _killpg(proc.pid, signal.SIGKILL)  # stray children of a finished command
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process group of ``proc`` (default: pull the plug)."""
        _killpg(proc.pid, sig)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
        """SIGTERM the group, wait up to ``timeout`` s, then SIGKILL it."""
        _killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=10)
        finally:
            _killpg(proc.pid, signal.SIGKILL)

    def pids(self) -> list[int]:
        """Every process living in this box's namespace."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL everything this box started, and anything left in it."""
        for proc in self.procs:
            _killpg(proc.pid, signal.SIGKILL)
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class NetnsLab:
    """A bridge and N namespace boxes on ``<subnet>.0/24``.

    ``subnet`` is the first three octets of a private /24 (default
    10.77.0); box i gets ``<subnet>.<i+1>``. ``host_address`` (e.g. 254)
    also puts the host on the bridge, for tests that talk to boxes from the
    test process; leave it None unless needed, so two labs never add
    overlapping routes to the host.
    """

    def __init__(
        self,
        n: int = 0,
        *,
        subnet: str = "10.77.0",
        root: Path | None = None,
        cpus: float | None = None,
        memory_bytes: int | None = None,
        host_address: int | None = None,
        prefix: str = "emt",
    ) -> None:
        # Names must be unique per lab and fit IFNAMSIZ (15 chars); ``prefix``
        # (3 letters) tells apart the labs of test modules that run at once.
        self.tag = f"{prefix[:3]}{os.getpid() % 100000}{next(_counter)}"
        self.subnet = subnet
        self.bridge = f"{self.tag}b"[:15]
        self.boxes: list[Box] = []
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="netnslab-")) if root is None else root
        self.host_address = f"{subnet}.{host_address}" if host_address else None
        self._closed = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            # Multicast snooping would hold back mDNS until a querier exists.
            (Path("/sys/class/net") / self.bridge / "bridge/multicast_snooping").write_text("0")
            _ip("link", "set", self.bridge, "up")
            if self.host_address:
                _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            for _ in range(n):
                self.add_box(cpus=cpus, memory_bytes=memory_bytes)
        except BaseException:
            self.close()
            raise

    def add_box(self, *, cpus: float | None = None, memory_bytes: int | None = None) -> Box:
        """Create the next box; ``cpus``/``memory_bytes`` cap its processes."""
        index = len(self.boxes) + 1
        if index > 250:
            raise ValueError("a /24 lab holds at most 250 boxes")
        name = f"{self.tag}n{index}"
        host_end = f"{self.tag}h{index}"[:15]
        box_end = f"{self.tag}c{index}"[:15]
        box_dir = self.root / f"box{index}"
        box_dir.mkdir(parents=True, exist_ok=True)
        box = Box(name, index, f"{self.subnet}.{index}", "eth0", box_dir)
        self.boxes.append(box)  # registered first, so close() removes half-built boxes
        _ip("netns", "add", name)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", box_end)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        _ip("link", "set", box_end, "netns", name)
        _ip("-n", name, "link", "set", box_end, "name", box.iface)
        _ip("-n", name, "addr", "add", f"{box.address}/24", "dev", box.iface)
        _ip("-n", name, "link", "set", box.iface, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        if cpus is not None or memory_bytes is not None:
            box.cgroup = Limits(cpus, memory_bytes, name=name).create()
        return box

    def close(self) -> None:
        """Kill everything in every box, then remove namespaces, links, cgroups."""
        if self._closed:
            return
        self._closed = True
        for box in self.boxes:
            box.kill_all()
        for box in self.boxes:
            _ip("netns", "del", box.name, check=False)
            _ip("link", "del", f"{self.tag}h{box.index}"[:15], check=False)
            if box.cgroup is not None:
                box.cgroup.remove()
        _ip("link", "del", self.bridge, check=False)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Box]:
        return iter(self.boxes)


def leftovers(tag_prefix: str = "emt") -> list[str]:
    """Namespaces of labs (any test run) still present; for sanity checks."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag_prefix)]
