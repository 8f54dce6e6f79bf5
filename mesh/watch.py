"""A thread that watches the head's Ray GCS for its box's agent.

Once a second it checks that the head's GCS port answers (a plain TCP
connect, which a dead head refuses at once) and reads the node table.
Three failed probes in a row report the head lost; node-table snapshots
go to the agent, which turns dead nodes into ``crash`` events. The
deployment records are reconciled on the same beat. A GCS client is only
created after the port answers, because creating one against a dead head
blocks for ~11 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgemesh.errors import EdgemeshError
from edgemesh.mesh.deployments import DeploymentStore, sync
from edgemesh.mesh.ray_node import Gcs, RayNodeInfo, tcp_reachable

log = logging.getLogger(__name__)

LOST_AFTER_PROBES = 3
# A head that was never reached may still be starting (its GCS takes seconds
# on a small box): give it longer before calling it lost.
NEVER_UP_PROBES = 30


class RayWatcher(threading.Thread):
    """Watches one GCS address at a time (``target``); callbacks run on this thread."""

    def __init__(
        self,
        *,
        on_nodes: Callable[[str, list[RayNodeInfo]], None],
        on_head_lost: Callable[[str, tuple[str, float] | None], None],
        deployments: DeploymentStore | None = None,
        period_s: float = 1.0,
    ) -> None:
        super().__init__(name="ray-watch", daemon=True)
        self._on_nodes = on_nodes
        self._on_head_lost = on_head_lost
        self._deployments = deployments
        self._period = period_s
        self._lock = threading.Lock()
        self._address = ""
        self._head: tuple[str, float] | None = None
        self._halt = threading.Event()
        self._gcs: Gcs | None = None
        self._fails = 0
        self._reported = False
        self._seen_up = False

    def target(self, address: str, head: tuple[str, float] | None) -> None:
        """Watch ``address`` (empty: nothing); ``head`` is the incarnation
        reported lost when it stops answering (None for our own head)."""
        with self._lock:
            if address == self._address and head == self._head:
                return
            self._address, self._head = address, head
            self._fails, self._reported, self._seen_up = 0, False, False

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self._once()
            except Exception:  # keep watching whatever one round did
                log.exception("Ray watch round failed")
            self._halt.wait(max(0.0, self._period - (time.monotonic() - started)))

    def _once(self) -> None:
        with self._lock:
            address, head = self._address, self._head
        if not address:
            self._gcs = None
            return
        if not tcp_reachable(address, timeout=1.0):
            self._gcs = None
            self._fails += 1
            limit = LOST_AFTER_PROBES if self._seen_up else NEVER_UP_PROBES
            if self._fails >= limit and not self._reported:
                self._reported = True
                log.warning("the Ray head at %s stopped answering", address)
                self._on_head_lost(address, head)
            return
        self._fails = 0
        self._seen_up = True
        try:
            if self._gcs is None or self._gcs.address != address:
                self._gcs = Gcs(address)
            nodes = self._gcs.nodes()
        except EdgemeshError as exc:
            log.debug("reading the node table failed: %s", exc)
            self._gcs = None
            return
        with self._lock:
            if address != self._address:
                return  # retargeted meanwhile; this snapshot is stale
        self._on_nodes(address, nodes)
        if self._deployments is not None:
            try:
                gcs = self._gcs
                what = sync(self._deployments, gcs.kv_get, gcs.kv_put)
                if what != "same":
                    log.info("deployment records %s (head %s)", what, address)
            except EdgemeshError as exc:
                log.debug("deployment sync failed: %s", exc)
