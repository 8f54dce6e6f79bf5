"""Ray for one box: start/stop its node, watch the head's node table.

Each box runs ``ray start --head`` or ``ray start --address`` with
``--block`` as a child of its agent (same process group, so pulling a box's
plug kills its Ray too), with:

* token auth on (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH`` pointing
  at the box's 0600 ``ray_token`` file, derived from the mesh secret);
* ``--node-ip-address`` on the mesh interface, its own ``--temp-dir``;
* custom resources ``box:<id>`` and ``accel:<kind>`` to pin shards;
* no dashboard, a small object store, ``--num-cpus`` from the fingerprint;
* GCS health checks every second, so a crashed node is declared dead in ~3 s
  instead of Ray's default ~30 s.

Other code on a box (the router) talks to the mesh through
``edgemesh.mesh.connect``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from edgemesh.errors import BoxLostError, MeshError, MissingExtraError

log = logging.getLogger(__name__)

NODE_ALIVE = 0
# Ray's own defaults wait ~30 s to declare a node dead; the mesh wants seconds.
HEALTH_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
_RAY_MAIN = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
_PR_SET_PDEATHSIG = 1


def ray_version() -> str:
    """Installed Ray version ("none" without the mesh extra); read without importing Ray."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "none"


def box_resources(box_id: str, accelerator_kinds: list[str]) -> dict[str, float]:
    """Custom resources that let shards be pinned to a box or accelerator."""
    res = {f"box:{box_id}": 1.0}
    for kind in sorted(set(accelerator_kinds)):
        res[f"accel:{kind}"] = 1.0
    return res


def auth_env(token_path: Path) -> dict[str, str]:
    """What every process talking to the mesh's Ray needs in its environment."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",  # never phone home from a box
    }


def use_token(token_path: Path) -> None:
    """Put the auth settings into this process's environment; must run
    before Ray is imported here, since Ray caches them on first use."""
    os.environ.update(auth_env(token_path))


@dataclass
class RaySpec:
    """How to start this box's Ray node."""

    head: bool
    node_ip: str
    temp_dir: Path
    token_path: Path
    log_path: Path
    port: int = 6379
    head_address: str = ""
    num_cpus: int = 1
    object_store_bytes: int = 128 << 20
    resources: dict[str, float] = field(default_factory=dict)
    base_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """The GCS address of the cluster this node belongs to."""
        return f"{self.node_ip}:{self.port}" if self.head else self.head_address

    def argv(self) -> list[str]:
        args = [
            sys.executable,
            "-c",
            _RAY_MAIN,
            "start",
            "--block",
            "--node-ip-address",
            self.node_ip,
            "--temp-dir",
            str(self.temp_dir),
            "--num-cpus",
            str(self.num_cpus),
            "--object-store-memory",
            str(self.object_store_bytes),
            "--resources",
            json.dumps(self.resources),
            "--disable-usage-stats",
        ]
        if self.head:
            args += ["--head", "--port", str(self.port), "--include-dashboard=false"]
        else:
            args += ["--address", self.head_address]
        return args

    def env(self) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(auth_env(self.token_path))
        env.update(HEALTH_ENV)
        env["RAY_TMPDIR"] = str(self.temp_dir)
        return env


def _die_with_parent() -> None:
    # Runs in the child before exec: if the agent dies without stopping Ray
    # (SIGKILL of the agent alone), Ray gets SIGTERM and shuts its node down.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


KEEP_SESSIONS = 3
"""Ray folders (logs, sockets) of the last runs kept in a box's temp dir."""


def prune_sessions(temp_dir: Path, keep: int = KEEP_SESSIONS) -> list[Path]:
    """Remove all but the ``keep`` newest ``session_*`` folders under ``temp_dir``.

    Every ``ray start`` opens a new session folder and Ray never removes the
    old ones, so a box that rejoins for months fills its disk with logs. The
    newest few stay for post-mortems; ``session_latest`` (a link) is kept.
    """
    sessions = [d for d in temp_dir.glob("session_*") if d.is_dir() and not d.is_symlink()]
    sessions.sort(key=lambda d: (d.stat().st_mtime, d.name), reverse=True)
    old = sessions[keep:]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    if old:
        log.info("removed %d old Ray session folders from %s", len(old), temp_dir)
    return old


class RayProcess:
    """One ``ray start --block`` and the Ray processes under it."""

    def __init__(self, spec: RaySpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.spec.temp_dir.mkdir(parents=True, exist_ok=True)
        prune_sessions(self.spec.temp_dir)
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as out:
            out.write(f"\n--- {' '.join(self.spec.argv()[3:])}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(
                    self.spec.argv(),
                    env=self.spec.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise MeshError(f"cannot start Ray: {exc}") from exc
        kind = "head" if self.spec.head else f"worker of {self.spec.head_address}"
        log.info("started Ray %s on %s (pid %d)", kind, self.spec.node_ip, self.proc.pid)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM ``ray start`` and every Ray process under it at once (each
        shuts down on its own; asking only ``ray start`` took over 20 s on
        2 cores), then SIGKILL whatever is left after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        tree = _tree(proc.pid)
        _signal_all(tree, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        # Ray may have started more processes while the first ones stopped.
        alive = list({p.pid: p for p in [*alive, *_tree(proc.pid)]}.values())
        if alive:
            names = sorted({_name(p) for p in alive})
            # Usual on a busy small box: raylet and GCS drain slowly.
            log.info(
                "%d Ray process(es) outlived SIGTERM by %.0f s; killing %s",
                len(alive),
                grace_s,
                ", ".join(names),
            )
            _signal_all(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("ray start (pid %d) survived SIGKILL", proc.pid)


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


@dataclass(frozen=True)
class RayNodeInfo:
    """One row of the head's node table."""

    node_id: str
    address: str
    alive: bool
    is_head: bool
    box_id: str | None
    expected_death: bool
    resources: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "alive": self.alive,
            "is_head": self.is_head,
            "box": self.box_id,
            "resources": self.resources,
        }


def tcp_reachable(address: str, timeout: float = 1.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class Gcs:
    """A client of one head's GCS (node table, KV) without a Ray driver.

    ``use_token()`` must have run in this process. Creating the client
    blocks for up to ~11 s when the GCS is down, so callers probe with
    ``tcp_reachable`` first and keep it off latency-sensitive threads.
    """

    def __init__(self, address: str) -> None:
        try:
            from ray._raylet import GcsClient  # type: ignore[attr-defined]  # not in ray's .pyi
        except ImportError as exc:
            raise MissingExtraError("ray", "mesh") from exc
        self.address = address
        try:
            self._client = GcsClient(address=address)
        except Exception as exc:
            raise BoxLostError(f"the Ray head at {address} does not answer: {exc}") from exc

    def nodes(self, timeout: float = 2.0) -> list[RayNodeInfo]:
        try:
            table = self._client.get_all_node_info(timeout=timeout)
        except Exception as exc:
            raise BoxLostError(f"the Ray head at {self.address} does not answer: {exc}") from exc
        out = []
        for node_id, info in table.items():
            res = dict(info.resources_total)
            box = next((k.split(":", 1)[1] for k in res if k.startswith("box:")), None)
            out.append(
                RayNodeInfo(
                    node_id=node_id.hex(),
                    address=info.node_manager_address,
                    alive=info.state == NODE_ALIVE,
                    is_head=bool(info.is_head_node),
                    box_id=box,
                    expected_death=info.death_info.reason == 1,  # EXPECTED_TERMINATION
                    resources=res,
                )
            )
        return out

    def kv_get(self, key: str, namespace: str = "edgemesh") -> bytes | None:
        try:
            return self._client.internal_kv_get(key.encode(), namespace.encode(), timeout=2)
        except Exception as exc:
            raise BoxLostError(f"reading '{key}' from the Ray head failed: {exc}") from exc

    def kv_put(self, key: str, value: bytes, namespace: str = "edgemesh") -> None:
        try:
            self._client.internal_kv_put(key.encode(), value, True, namespace.encode(), timeout=2)
        except Exception as exc:
            raise BoxLostError(f"writing '{key}' to the Ray head failed: {exc}") from exc
