"""The gateway's event log: joins, losses, re-plans, deploys, errors.

A bounded in-memory list (the newest ``capacity``) on the gateway, fed by
the code paths where things happen: the management actions, the mesh
pipeline's recovery callback, failed requests. On the mesh the page also
merges the head agent's membership log (``events.jsonl``:
join/leave/crash/head), which survives the gateway replica; ``merge_agent_log``
turns those lines into the same ``Event`` shape.

Every event gets a sequence number so a poller asks only for what is new
(``since``); merged agent events are numbered when they are first read.

With a state folder (``persist``) the gateway's own events are appended to
``gateway-events.jsonl`` there and read back at start, so a restarted
gateway still shows its deploys, drains and failures. The file is bounded:
past ``2 x capacity`` lines it is rewritten with the newest ``capacity``.
Merged agent events are not written: the agent's own log holds them and is
merged again from its start after a restart.
"""

from __future__ import annotations

import json
import logging
import os
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
LOG_FILE = "gateway-events.jsonl"
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
        self._capacity = capacity
        self._own: deque[Event] = deque(maxlen=capacity)  # what the file keeps
        self._path: Path | None = None
        self._lines = 0  # lines in the file at _path

    def persist(self, folder: Path) -> int:
        """Keep this log in ``folder/gateway-events.jsonl``: read back what an
        earlier gateway wrote there (numbering continues after it), then append
        every own event. Returns how many events were read back. A corrupt
        line (a crash mid-write) is skipped."""
        path = Path(folder) / LOG_FILE
        loaded: list[Event] = []
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        d = json.loads(line)
                        loaded.append(
                            Event(
                                int(d["seq"]),
                                str(d["kind"]),
                                str(d["message"]),
                                str(d.get("level", "info")),
                                d.get("box"),
                                d.get("model"),
                                float(d["at"]),
                            )
                        )
                    except (ValueError, KeyError, TypeError):
                        log.warning("skipping a damaged line of %s", path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the log is a convenience: serving goes on
            log.warning("cannot read the saved events %s: %s", path, exc)
        loaded.sort(key=lambda e: e.seq)
        with self._lock:
            # Events added before this call follow the loaded ones, renumbered.
            early = list(self._events)
            self._events.clear()
            self._events.extend(loaded)
            self._own.clear()
            self._own.extend(loaded)
            self._seq = loaded[-1].seq if loaded else 0
            self._path, self._lines = path, len(loaded)
            for e in early:
                self._seq += 1
                moved = Event(self._seq, e.kind, e.message, e.level, e.box, e.model, e.at)
                self._events.append(moved)
                self._own.append(moved)
                self._write(moved)
        return len(loaded)

    def _write(self, event: Event) -> None:
        """Append ``event`` (already in ``_own``) to the file; the caller
        holds the lock. Once the file holds ``2 x capacity`` lines it is
        rewritten with the newest ``capacity`` own events instead."""
        if self._path is None:
            return
        try:
            if self._lines >= 2 * self._capacity:
                tmp = self._path.with_suffix(".tmp")
                with open(tmp, "w") as f:
                    for e in self._own:
                        f.write(json.dumps(e.to_dict()) + "\n")
                os.replace(tmp, self._path)
                self._lines = len(self._own)
                return  # ``event`` is the newest of them
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path, "a") as f:
                f.write(json.dumps(event.to_dict()) + "\n")
            self._lines += 1
        except OSError as exc:  # a full disk must not stop the gateway
            log.warning("cannot save an event to %s: %s", self._path, exc)

    def add(
        self,
        kind: str,
        message: str,
        *,
        level: str = "info",
        box: str | None = None,
        model: str | None = None,
        at: float | None = None,
        _saved: bool = True,
    ) -> Event:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind '{kind}'; one of {', '.join(KINDS)}")
        if level not in LEVELS:
            raise ValueError(f"unknown event level '{level}'")
        with self._lock:
            self._seq += 1
            event = Event(self._seq, kind, message, level, box, model, at or time.time())
            self._events.append(event)
            if _saved:
                self._own.append(event)
                self._write(event)
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
                _saved=False,  # the agent's log keeps it; merged again after a restart
            )
            added += 1
        with self._lock:
            self._agent_pos = pos + end
        return added


_VERB = {"join": "joined", "leave": "left", "lost": "was lost", "head": "is the head"}
