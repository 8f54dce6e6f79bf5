"""Who is in the mesh, and events when that changes.

``Membership`` is fed by two sources, whichever speaks first: mDNS (a
verified record appears: ``join``; a goodbye: ``leave``) and Ray (a box's
node dies, or its head stops answering: ``crash``). A ``head`` event marks
a new head. Consumers in the agent's process subscribe::

    unsubscribe = agent.membership.subscribe(lambda ev: print(ev.kind, ev.box_id))
    for ev in agent.membership.events(timeout=5): ...

Other processes (the planner, the router) follow the agent's event log in
its state folder with ``follow(state_dir)`` (or ``follow(mesh=...)``), which yields the same
``MemberEvent`` objects.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.mesh.records import BoxRecord

log = logging.getLogger(__name__)

JOIN = "join"
LEAVE = "leave"
CRASH = "crash"
HEAD_CHANGE = "head"
KINDS = (JOIN, LEAVE, CRASH, HEAD_CHANGE)

# A crashed incarnation stays "dead" this long, so its record (still cached
# by mDNS until its TTL runs out) is not mistaken for a live box.
_DEAD_MEMORY_S = 600.0


@dataclass(frozen=True)
class MemberEvent:
    """One change of membership, as seen by one box."""

    kind: str
    box_id: str
    role: str = ""
    address: str = ""
    reason: str = ""
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "box_id": self.box_id,
            "role": self.role,
            "address": self.address,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberEvent:
        return cls(
            kind=d["kind"],
            box_id=d["box_id"],
            role=d.get("role", ""),
            address=d.get("address", ""),
            reason=d.get("reason", ""),
            at=float(d.get("at", 0.0)),
        )


@dataclass
class Member:
    """A live box and what this box knows of its health."""

    record: BoxRecord
    since: float
    last_seen: float = 0.0
    ray_alive: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.record.to_dict(),
            "since": self.since,
            "last_seen": self.last_seen,
            "ray_alive": self.ray_alive,
        }


class Membership:
    """The live boxes of the mesh (this box included) and their events."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._members: dict[str, Member] = {}
        # incarnation -> (when, why, last sequence number seen)
        self._dead: dict[tuple[str, float], tuple[float, str, int]] = {}
        self._subscribers: list[Callable[[MemberEvent], None]] = []
        self._queues: list[queue.Queue[MemberEvent]] = []
        self._head: str | None = None

    # -- consumers -------------------------------------------------------

    def subscribe(self, callback: Callable[[MemberEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every later event; returns an unsubscribe.

        Callbacks run on the thread that noticed the change; keep them short.
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def events(self, timeout: float | None = None) -> Iterator[MemberEvent]:
        """Iterate over later events; stops after ``timeout`` s without one."""
        q: queue.Queue[MemberEvent] = queue.Queue()
        with self._lock:
            self._queues.append(q)
        try:
            while True:
                try:
                    yield q.get(timeout=timeout)
                except queue.Empty:
                    return
        finally:
            with self._lock:
                self._queues.remove(q)

    def members(self) -> list[Member]:
        with self._lock:
            return sorted(self._members.values(), key=lambda m: m.record.box_id)

    def live_records(self) -> list[BoxRecord]:
        return [m.record for m in self.members()]

    def get(self, box_id: str) -> Member | None:
        with self._lock:
            return self._members.get(box_id)

    def lost(self) -> list[dict[str, Any]]:
        """Recently crashed incarnations: box id, when, why."""
        with self._lock:
            return [
                {"id": box, "started": started, "at": at, "reason": why}
                for (box, started), (at, why, _) in sorted(self._dead.items())
            ]

    @property
    def head(self) -> str | None:
        return self._head

    # -- producers -------------------------------------------------------

    def is_dead(self, record: BoxRecord) -> bool:
        with self._lock:
            return record.incarnation in self._dead

    def upsert(self, record: BoxRecord) -> None:
        """A verified record was seen (new box, or an update of a known one)."""
        events: list[MemberEvent] = []
        now = time.time()
        with self._lock:
            dead = self._dead.get(record.incarnation)
            if dead is not None:
                if record.seq <= dead[2]:
                    return  # a cached record of a box we know has crashed
                # A newer record: the box was only unreachable, not dead.
                del self._dead[record.incarnation]
            old = self._members.get(record.box_id)
            if old is not None and old.record.started != record.started:
                if record.started < old.record.started:
                    return  # an old run's record, still cached
                # The box restarted without a goodbye: its old run crashed.
                self._dead[old.record.incarnation] = (now, "restarted", old.record.seq)
                events.append(self._event(CRASH, old.record, "restarted"))
                old = None
            if old is None:
                self._members[record.box_id] = Member(record, now, now)
                events.append(self._event(JOIN, record, "announced"))
            elif record.seq > old.record.seq:
                old.record = record
                old.last_seen = now
            events += self._head_check()
        self._emit(events)

    def remove(self, box_id: str, reason: str = "goodbye") -> None:
        """The box said goodbye (or its record expired)."""
        with self._lock:
            old = self._members.pop(box_id, None)
            events = [self._event(LEAVE, old.record, reason)] if old else []
            events += self._head_check()
        self._emit(events)

    def crashed(self, box_id: str, started: float | None, reason: str) -> None:
        """The box's Ray node died or its head stopped answering."""
        with self._lock:
            old = self._members.get(box_id)
            if old is None or (started is not None and old.record.started != started):
                return  # already gone, or that run was replaced by a newer one
            del self._members[box_id]
            self._dead[old.record.incarnation] = (time.time(), reason, old.record.seq)
            events = [self._event(CRASH, old.record, reason), *self._head_check()]
        self._emit(events)

    def set_ray_alive(self, alive: dict[str, bool]) -> None:
        """Ray's view per box id (from the head's node table)."""
        with self._lock:
            for box_id, member in self._members.items():
                member.ray_alive = alive.get(box_id)

    def forget_dead(self, now: float | None = None) -> None:
        """Drop dead incarnations older than the cache could still hold."""
        now = now or time.time()
        with self._lock:
            for key, (at, _, _) in list(self._dead.items()):
                if now - at > _DEAD_MEMORY_S:
                    del self._dead[key]

    # -- internals -------------------------------------------------------

    def _event(self, kind: str, record: BoxRecord, reason: str) -> MemberEvent:
        return MemberEvent(kind, record.box_id, record.role, record.address, reason)

    def _head_check(self) -> list[MemberEvent]:
        heads = [m.record for m in self._members.values() if m.record.role == "head"]
        best = min(heads, key=lambda r: r.key) if heads else None
        new = best.box_id if best else None
        if new == self._head:
            return []
        self._head = new
        if best is None:
            return []
        return [self._event(HEAD_CHANGE, best, "elected")]

    def _emit(self, events: list[MemberEvent]) -> None:
        if not events:
            return
        with self._lock:
            subscribers = list(self._subscribers)
            queues = list(self._queues)
        for ev in events:
            log.info("member %s: %s (%s, %s)", ev.kind, ev.box_id, ev.role, ev.reason)
            for q in queues:
                q.put(ev)
            for cb in subscribers:
                try:
                    cb(ev)
                except Exception:  # a broken consumer must not stop membership
                    log.exception("membership subscriber failed on %s", ev)


class EventLog:
    """Appends events to ``events.jsonl`` for other processes; rotates at ~1 MB."""

    def __init__(self, path: Path, max_bytes: int = 1 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def __call__(self, event: MemberEvent) -> None:
        line = json.dumps(event.to_dict()) + "\n"
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size > self.max_bytes:
                    self.path.replace(self.path.with_suffix(".jsonl.1"))
                with open(self.path, "a") as f:
                    f.write(line)
            except OSError:
                log.exception("cannot append to %s", self.path)


def follow(
    state_dir: Path | None = None,
    *,
    mesh: str | None = None,
    from_start: bool = False,
    timeout: float | None = None,
    poll_s: float = 0.2,
) -> Iterator[MemberEvent]:
    """Yield the events a box's agent logs, as they come (another process's API).

    ``from_start`` replays the log first; ``timeout`` ends the iteration
    after that many seconds without an event. ``state_dir`` defaults to the
    default folder of ``mesh`` ("default").
    """
    from edgemesh.mesh.config import StatePaths, state_folder

    path = StatePaths(state_folder(state_dir, mesh)).events
    pos = 0 if from_start or not path.exists() else path.stat().st_size
    last = time.monotonic()
    buf = ""
    while True:
        try:
            size = path.stat().st_size
            if size < pos:  # rotated
                pos = 0
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            if line.strip():
                try:
                    yield MemberEvent.from_dict(json.loads(line))
                except (ValueError, KeyError):
                    log.warning("skipping a malformed event line in %s", path)
                last = time.monotonic()
        if timeout is not None and time.monotonic() - last > timeout:
            return
        time.sleep(poll_s)
