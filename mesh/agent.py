"""The join loop: what ``edgemesh join`` runs on every box.

Every quarter second the agent applies the election rule
(``edgemesh.mesh.election``) to the verified records it sees and acts:
start a Ray head, join a head as a Ray worker, step down, or wait. It
re-announces itself every ``HEARTBEAT_S`` so peers can tell a silent box
from a live one, mirrors its view into ``state.json`` (for ``status``, the
router and ``ray_node.connect``), and logs membership events to
``events.jsonl``. ``stop()`` (SIGTERM/SIGINT in the CLI) says goodbye over
mDNS first, so peers react at once, then stops Ray.

Heavy imports (zeroconf, Ray) happen when the agent runs, not on import.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemesh import __version__
from edgemesh.errors import ConfigError, MeshError
from edgemesh.mesh.box_id import collision_hint, resolve_box_id
from edgemesh.mesh.config import JoinSettings, MeshSecret, process_env, write_json, write_private
from edgemesh.mesh.deployments import DeploymentStore
from edgemesh.mesh.discovery import Discovery
from edgemesh.mesh.election import FOLLOW, LEAD, Decision, decide
from edgemesh.mesh.membership import EventLog, Membership
from edgemesh.mesh.network import MeshInterface, choose_interface
from edgemesh.mesh.ray_node import (
    RayNodeInfo,
    RayProcess,
    RaySpec,
    box_resources,
    ray_version,
    tcp_reachable,
)
from edgemesh.mesh.ray_node import use_token as use_ray_token
from edgemesh.mesh.records import CANDIDATE, HEAD, WORKER, BoxRecord

if TYPE_CHECKING:
    from edgemesh.fingerprint import Fingerprint

log = logging.getLogger(__name__)

TICK_S = 0.25
HEARTBEAT_S = 10.0
SILENT_AFTER_S = 3.5 * HEARTBEAT_S  # no fresh record for this long: crashed
WAIT_FOR_HEAD_S = 15.0  # an elected box that does not lead by then is skipped
SUSPECT_S = 30.0
CRASH_CONFIRM_S = 1.5  # a dead Ray node must stay dead this long to be a crash
JOIN_RETRIES = 3
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL when leaving a live cluster
LOST_HEAD_GRACE_S = 1.0  # ... and when its head is already gone


OnHead = Callable[[Path, DeploymentStore], Callable[[], None] | None]
"""Called once this box's Ray head is up, with the state folder and the
deployment records; returns what to call when the agent leaves (or None).
The CLI passes the router's restore (``edgemesh.router.restore.on_head``):
the mesh layer itself knows nothing of the router above it."""


class Agent:
    """One box's membership in a mesh. ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        settings: JoinSettings,
        secret: MeshSecret,
        fingerprint: Fingerprint | None = None,
        *,
        start_ray: bool = True,
        interface: MeshInterface | None = None,
        on_head: OnHead | None = None,
    ) -> None:
        self.settings = settings
        self._on_head = on_head
        self._on_leave: Callable[[], None] | None = None
        self.paths = settings.paths.ensure()
        # Unique per box without --box-id, and kept in the state folder (mesh.box_id).
        self.identity = resolve_box_id(self.paths, settings.box_id)
        if fingerprint is None:
            from edgemesh.fingerprint import collect

            fingerprint = collect(box_id=self.identity.box_id)
        self.iface = interface or choose_interface(settings.interface)
        self.start_ray = start_ray
        fp = fingerprint.to_dict()
        self._accels = [a["kind"] for a in fp.get("accelerators", [])]
        self._cpus = max(1, round(fingerprint.summary().get("cores_effective") or 1))
        self.record = BoxRecord(
            mesh=settings.mesh,
            box_id=self.identity.box_id,
            role=CANDIDATE,
            address=self.iface.address,
            # Millisecond precision: what the TXT record carries, so this
            # box's own record read back from mDNS is the same incarnation.
            started=int(time.time() * 1000) / 1000,
            version=__version__,
            ray_version=ray_version(),
            fp_digest=fingerprint.digest(),
            summary=fingerprint.summary(),
        )
        self.membership = Membership()
        self.membership.subscribe(EventLog(self.paths.events))
        self.deployments = DeploymentStore(self.paths.deployments)
        self.discovery = Discovery(
            mesh=settings.mesh,
            key=secret.mdns_key(settings.mesh),
            address=self.iface.address,
            version=__version__,
            ray_version=self.record.ray_version,
            on_record=self._on_record,
            on_remove=self._on_remove,
            collision_hint=collision_hint(self.identity),
        )
        write_private(self.paths.ray_token, secret.ray_token(settings.mesh))
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the record against the watcher
        self._ray: RayProcess | None = None
        self._following: tuple[str, float] | None = None
        self._watcher: Any = None
        self._nodes: tuple[str, list[RayNodeInfo]] = ("", [])
        self._was_alive: set[str] = set()
        self._pending_crash: dict[str, float] = {}
        self._settle_until = float("inf")
        self._suspects: dict[tuple[str, float], float] = {}
        self._join_failures: dict[tuple[str, float], int] = {}
        self._retry_at = 0.0
        self._next_probe = 0.0
        self._waiting: tuple[str, float] | None = None
        self._last_announce = 0.0
        self._last_state = 0.0
        self._collision: BoxRecord | None = None
        self._reannounce = threading.Event()
        self.decision = Decision("wait", None, "starting")

    @property
    def box_id(self) -> str:
        return self.record.box_id

    # -- lifecycle -------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to leave the mesh cleanly (safe from signal handlers)."""
        self._stop.set()

    def run(self) -> None:
        log.info(
            "box %s joining mesh '%s' on %s (%s)",
            self.box_id,
            self.settings.mesh,
            self.iface.name,
            self.iface.address,
        )
        try:
            if self.start_ray:
                use_ray_token(self.paths.ray_token)
                from edgemesh.mesh.watch import RayWatcher

                self._watcher = RayWatcher(
                    on_nodes=self._on_nodes,
                    on_head_lost=self._on_head_lost,
                    deployments=self.deployments,
                )
                self._watcher.start()
            self.membership.upsert(self.record)
            self.discovery.start(self.record)
            self._metrics = _box_exporter(self.iface.address, self.box_id)
            self._last_announce = time.monotonic()
            self._settle_until = time.monotonic() + self.settings.settle_s
            while not self._stop.is_set():
                self._tick()
                self._stop.wait(TICK_S)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        log.info("box %s leaving mesh '%s'", self.box_id, self.settings.mesh)
        self.discovery.close()  # goodbye first: peers react before Ray goes
        if self._watcher is not None:
            self._watcher.stop()
        if self._on_leave is not None:
            self._on_leave()
        self._stop_ray()
        if getattr(self, "_metrics", None) is not None:
            self._metrics.shutdown()
        self._write_state(force=True, running=False)

    # -- the loop --------------------------------------------------------

    def _tick(self) -> None:
        if self._collision is not None:
            other = self._collision
            raise ConfigError(
                f"another box already announces the id '{self.box_id}' in mesh "
                f"'{self.settings.mesh}' (from {other.address})",
                hint=collision_hint(self.identity),
            )
        if self._reannounce.is_set():
            self._reannounce.clear()
            self._announce()
        now = time.monotonic()
        self._check_ray(now)
        self._prune(now)
        peers = [
            r
            for r in self.membership.live_records()
            if r.box_id != self.box_id and r.incarnation not in self._suspects
        ]
        decision = decide(self.record, peers, settled=now >= self._settle_until)
        if decision.action == LEAD:
            self._lead()
        elif decision.action == FOLLOW and decision.head is not None:
            self._follow(decision.head, now)
        else:
            self._wait(decision, now)
        if (decision.action, decision.head and decision.head.box_id) != (
            self.decision.action,
            self.decision.head and self.decision.head.box_id,
        ):
            log.info("election: %s (%s)", decision.action, decision.reason)
        self.decision = decision
        if now - self._last_announce > HEARTBEAT_S:
            self._announce()
        self._write_state()

    def _lead(self) -> None:
        if self.record.role != HEAD:
            if time.monotonic() < self._retry_at:
                return
            # Leading means no head is in sight: a worker's old head is gone.
            self._stop_ray(LOST_HEAD_GRACE_S)
            self._following = None
            address = ""
            if self.start_ray:
                spec = self._spec(head=True)
                self._ray = RayProcess(spec)
                self._ray.start()
                address = spec.address
                self._watcher.target(address, None)
            log.info("box %s is the head of mesh '%s'", self.box_id, self.settings.mesh)
            self._announce(role=HEAD, ray_address=address, ready=not self.start_ray)
        elif not self.record.ready and self._own_node_alive():
            log.info("Ray head is up at %s", self.record.ray_address)
            self._announce(ready=True)
            if self.start_ray and self._on_head is not None:  # e.g. restore the models
                self._on_leave = self._on_head(self.paths.root, self.deployments)

    def _follow(self, head: BoxRecord, now: float) -> None:
        self._waiting = None
        if self.record.role == WORKER and self._following == head.incarnation:
            if not self.record.ready and self._own_node_alive():
                log.info("joined the Ray cluster of %s", head.box_id)
                self._announce(ready=True)
            return
        if self.record.role != CANDIDATE or self._ray is not None:
            # Leaving a head we no longer follow (or stepping down as head).
            self._become_candidate(f"switching to head {head.box_id}")
        if now < self._retry_at or not (head.ready or self._gcs_answers(head, now)):
            return  # its Ray is still starting
        self._following = head.incarnation
        if self.start_ray:
            self._ray = RayProcess(self._spec(head=False, head_address=head.ray_address))
            self._ray.start()
            self._watcher.target(head.ray_address, head.incarnation)
        self._announce(role=WORKER, ray_address=head.ray_address, ready=not self.start_ray)

    def _gcs_answers(self, head: BoxRecord, now: float) -> bool:
        """Whether the head's GCS port accepts connections yet: a worker may
        start joining then, while the head's own node is still coming up,
        instead of waiting for the head's next announcement."""
        if not self.start_ray or not head.ray_address or now < self._next_probe:
            return False
        self._next_probe = now + 0.5
        return tcp_reachable(head.ray_address, timeout=0.3)

    def _wait(self, decision: Decision, now: float) -> None:
        if self.record.role != CANDIDATE:
            # The head is gone, so there is nothing to drain: stop Ray fast.
            self._become_candidate("lost the head", grace_s=LOST_HEAD_GRACE_S)
            self._settle_until = now + self.settings.settle_s / 2
        best = decision.head
        if best is None:
            self._waiting = None
            return
        if self._waiting is None or self._waiting[0] != best.box_id:
            self._waiting = (best.box_id, now)
        elif now - self._waiting[1] > WAIT_FOR_HEAD_S:
            log.warning("%s was elected but did not lead; skipping it for now", best.box_id)
            self._suspects[best.incarnation] = now + SUSPECT_S
            self._waiting = None

    def _become_candidate(self, why: str, grace_s: float = STOP_GRACE_S) -> None:
        log.info("box %s is a candidate again: %s", self.box_id, why)
        self._following = None
        self._announce(role=CANDIDATE, ray_address="", ready=False)
        self._stop_ray(grace_s)

    # -- Ray -------------------------------------------------------------

    def _spec(self, *, head: bool, head_address: str = "") -> RaySpec:
        return RaySpec(
            head=head,
            node_ip=self.iface.address,
            temp_dir=self.settings.ray_temp_dir or self.paths.root / "ray",
            token_path=self.paths.ray_token,
            log_path=self.paths.ray_log,
            port=self.settings.ray_port,
            head_address=head_address,
            num_cpus=self._cpus,
            object_store_bytes=self.settings.object_store_mb << 20,
            resources=box_resources(self.box_id, self._accels),
            # The gateway replica on the head reads this box's state.json and
            # events.jsonl through it (the dashboard's boxes and events).
            base_env={**process_env(), "EDGEMESH_STATE_DIR": str(self.paths.root)},
        )

    def _stop_ray(self, grace_s: float = STOP_GRACE_S) -> None:
        if self._watcher is not None:
            self._watcher.target("", None)
        ray, self._ray = self._ray, None
        if ray is not None:
            ray.stop(grace_s)
        self._nodes = ("", [])
        self._was_alive.clear()
        self._pending_crash.clear()

    def _check_ray(self, now: float) -> None:
        """React to our ``ray start`` exiting on its own."""
        if self._ray is None or self._ray.running():
            return
        code = self._ray.returncode
        self._ray = None
        if self.record.role == WORKER and self._following is not None:
            head = self._following
            fails = self._join_failures.get(head, 0) + 1
            self._join_failures[head] = fails
            log.warning(
                "Ray worker exited (code %s), try %d; see %s", code, fails, self.paths.ray_log
            )
            if fails >= JOIN_RETRIES:
                self._suspects[head] = now + SUSPECT_S
                self._join_failures.pop(head, None)
        else:
            log.warning("Ray head exited (code %s); see %s", code, self.paths.ray_log)
        self._retry_at = now + 2.0
        self._become_candidate("Ray exited")
        self._settle_until = now + self.settings.settle_s / 2

    def _own_node_alive(self) -> bool:
        address, nodes = self._nodes
        return address == self.record.ray_address and any(
            n.alive and n.box_id == self.box_id for n in nodes
        )

    def _on_nodes(self, address: str, nodes: list[RayNodeInfo]) -> None:
        """Watcher thread: a fresh node table of the head at ``address``."""
        self._nodes = (address, nodes)
        alive = {n.box_id: True for n in nodes if n.alive and n.box_id}
        for n in nodes:
            if n.box_id and n.box_id not in alive:
                alive[n.box_id] = False
        self.membership.set_ray_alive(alive)
        now = time.monotonic()
        for box in [b for b, ok in alive.items() if ok]:
            self._was_alive.add(box)
            self._pending_crash.pop(box, None)
        for box in list(self._was_alive):
            if alive.get(box) or box == self.box_id:
                continue
            member = self.membership.get(box)
            claims = member is not None and member.record.ray_address == address
            if not claims or member is None:
                self._was_alive.discard(box)  # it left or moved on: not a crash
                continue
            first = self._pending_crash.setdefault(box, now)
            if now - first >= CRASH_CONFIRM_S:
                self._was_alive.discard(box)
                self._pending_crash.pop(box, None)
                self.membership.crashed(box, member.record.started, "Ray node died")

    def _on_head_lost(self, address: str, head: tuple[str, float] | None) -> None:
        """Watcher thread: the head's GCS stopped answering."""
        if head is not None:
            self.membership.crashed(head[0], head[1], f"Ray head {address} unreachable")

    # -- records and state -----------------------------------------------

    def _on_record(self, record: BoxRecord) -> None:
        """Resolver thread: a verified record. One with this box's id but another
        incarnation is a duplicate id that mDNS probing missed (both probed at
        once, or a box too loaded to answer the probe in time): the one that was
        there first stays, the other leaves with the collision error."""
        mine = self.record
        if record.box_id == mine.box_id and record.incarnation != mine.incarnation:
            if (record.started, record.address) < (mine.started, mine.address):
                self._collision = record
            else:
                self._reannounce.set()  # peers' caches now hold the duplicate's record
            return
        self.membership.upsert(record)

    def _on_remove(self, box_id: str) -> None:
        """Resolver thread: a goodbye. One for this box's own name comes from a
        leaving duplicate; announcing again puts this box back in peers' caches."""
        if box_id == self.box_id:
            self._reannounce.set()
            return
        self.membership.remove(box_id)

    def _prune(self, now: float) -> None:
        wall = time.time()
        for member in self.membership.members():
            if member.record.box_id != self.box_id and wall - member.last_seen > SILENT_AFTER_S:
                self.membership.crashed(member.record.box_id, member.record.started, "silent")
        self._suspects = {k: t for k, t in self._suspects.items() if t > now}
        self.membership.forget_dead()

    def _announce(self, **changes: Any) -> None:
        with self._lock:
            self.record = self.record.evolve(**changes)
            record = self.record
        self._last_announce = time.monotonic()
        self.membership.upsert(record)
        try:
            self.discovery.announce(record)
        except MeshError as exc:
            log.warning("%s", exc)

    def state(self, *, running: bool = True) -> dict[str, Any]:
        """The agent's view, as written to ``state.json``."""
        address, nodes = self._nodes
        members = [m.to_dict() for m in self.membership.members()]
        return {
            "mesh": self.settings.mesh,
            "box_id": self.box_id,
            "pid": os.getpid(),
            "running": running,
            "updated": time.time(),
            "started": self.record.started,
            "role": self.record.role,
            "address": self.record.address,
            "interface": self.iface.to_dict(),
            "decision": self.decision.to_dict(),
            "head": self.membership.head,
            "ray": {
                "enabled": self.start_ray,
                "address": self.record.ray_address if self.record.ready else "",
                "node_ip": self.record.address,
                "token_file": str(self.paths.ray_token),
                "temp_dir": str(self.settings.ray_temp_dir),
                "running": self._ray is not None and self._ray.running(),
                "nodes": [n.to_dict() for n in nodes] if address else [],
            },
            "members": members,
            "lost": self.membership.lost(),
            "rejected": [r.to_dict() for r in self.discovery.rejected()],
        }

    def _write_state(self, *, force: bool = False, running: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last_state < 0.5:
            return
        self._last_state = now
        try:
            write_json(self.paths.state, self.state(running=running))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.paths.state, exc)


def _box_exporter(address: str, box_id: str) -> Any:
    """This box's own Prometheus metrics on ``address:9464`` (memory, CPU), which the
    head's ``/metrics/targets`` lists; None (logged) when the port is taken."""
    from edgemesh.box_metrics import BOX_METRICS_PORT, serve_box_metrics

    try:
        return serve_box_metrics(address, BOX_METRICS_PORT, box=box_id)
    except OSError as exc:
        log.warning("box metrics not exported on %s:%d: %s", address, BOX_METRICS_PORT, exc)
        return None
