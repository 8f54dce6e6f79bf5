"""The gateway's event log: joins, losses, re-plans, deploys, errors.

A bounded in-memory list (the newest ``capacity``) on the gateway, fed by
the code paths where things happen: the management actions, the mesh
pipeline's recovery callback, failed requests. On the mesh the page also
merges the head agent's membership log (``events.jsonl``:
join/leave/crash/head), which survives the gateway replica; ``merge_agent_log``
turns those lines into the same ``Event`` shape.

Every event gets a sequence number so a poller asks only for what is new
(``since``); merged agent events are numbered when they are first read.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = (
    "start",
    "join",
    "leave",
    "lost",
    "head",
    "deploy",
    "undeploy",
    "replan",
    "recover",
    "drain",
    "remove",
    "error",
)
LEVELS = ("info", "warning", "error")
_AGENT_KINDS = {"join": "join", "leave": "leave", "crash": "lost", "head": "head"}


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    message: str
    level: str = "info"
    box: str | None = None
    model: str | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "level": self.level,
            "box": self.box,
            "model": self.model,
            "message": self.message,
        }


class EventLog:
    """Thread-safe; ``add`` is cheap enough for any code path."""

    def __init__(self, capacity: int = 1000) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self._agent_pos = 0  # bytes of the agent's log already merged
        self._agent_inode: int | None = None

    def add(
        self,
        kind: str,
        message: str,
        *,
        level: str = "info",
        box: str | None = None,
        model: str | None = None,
        at: float | None = None,
    ) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind '{kind}'; one of {', '.join(KINDS)}")
        if level not in LEVELS:
            raise ValueError(f"unknown event level '{level}'")
        with self._lock:
            self._seq += 1
            event = Event(self._seq, kind, message, level, box, model, at or time.time())
            self._events.append(event)
        log.log(
            {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[level],
            "event %s: %s",
            kind,
            message,
        )
        return event

    def since(self, seq: int = 0, limit: int = 200) -> list[Event]:
        with self._lock:
            newer = [e for e in self._events if e.seq > seq]
        return newer[-limit:] if limit else newer

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def merge_agent_log(self, path: Path) -> int:
        """Add the agent's membership events appended since the last call;
        returns how many were added. A rotated log starts over."""
        try:
            stat = path.stat()
        except OSError:
            return 0
        with self._lock:
            if self._agent_inode != stat.st_ino or stat.st_size < self._agent_pos:
                first = self._agent_inode is None
                self._agent_inode, self._agent_pos = stat.st_ino, 0
                if not first:
                    log.debug("the agent's event log was rotated; reading it again")
            pos = self._agent_pos
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            return 0
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next call
        added = 0
        for line in chunk[:end].splitlines():
            try:
                d = json.loads(line)
                kind = _AGENT_KINDS[d["kind"]]
            except (ValueError, KeyError):
                continue
            role = f" ({d['role']})" if d.get("role") else ""
            why = f": {d['reason']}" if d.get("reason") else ""
            self.add(
                kind,
                f"box {d.get('box_id')}{role} {_VERB[kind]}{why}",
                level="warning" if kind == "lost" else "info",
                box=d.get("box_id"),
                at=float(d.get("at") or time.time()),
            )
            added += 1
        with self._lock:
            self._agent_pos = pos + end
        return added


_VERB = {"join": "joined", "leave": "left", "lost": "was lost", "head": "is the head"}
