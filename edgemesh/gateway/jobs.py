"""Long management actions (deploy, undeploy, re-plan, drain, remove) as jobs.

A route answers 202 with the job at once and the action runs in a thread;
the page (or the SDK) polls ``GET /api/jobs/{id}``. Jobs live in memory on
the gateway: a restarted gateway forgets them (what they did is in the
deployment records and the event log).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgemesh.errors import ConflictError, EdgemeshError, NotFoundError

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED = "running", "done", "failed"
KEEP = 50


@dataclass
class Job:
    id: str
    kind: str
    target: str
    state: str = RUNNING
    started: float = field(default_factory=time.time)
    finished: float | None = None
    message: str = ""
    result: Any = None
    error: str | None = None
    """The ``edgemesh.errors`` class name of a failure (what the SDK raises again)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "message": self.message,
            "result": self.result,
            "error": self.error,
        }


Action = Callable[[Job], tuple[str, Any]]
"""Does the work; returns (message, result). Raises EdgemeshError to fail."""


class Jobs:
    """The newest ``KEEP`` jobs; one running job per target at a time."""

    def __init__(self, on_fail: Callable[[Job, Exception], None] | None = None) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._on_fail = on_fail

    def start(self, kind: str, target: str, action: Action) -> Job:
        with self._lock:
            busy = next(
                (j for j in self._jobs.values() if j.target == target and j.state == RUNNING),
                None,
            )
            if busy is not None:
                raise ConflictError(
                    f"a {busy.kind} of '{target}' is already running (job {busy.id})",
                    code="busy",
                )
            job = Job(id=uuid.uuid4().hex[:12], kind=kind, target=target, message=f"{kind}…")
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, action), daemon=True).start()
        return job

    def _run(self, job: Job, action: Action) -> None:
        try:
            message, result = action(job)
            job.message, job.result, job.state = message, result, DONE
        except Exception as exc:
            # Every failure ends the job with the reason the user must read;
            # an unexpected one is logged with its traceback too.
            if not isinstance(exc, EdgemeshError):
                log.exception("%s of %s failed", job.kind, job.target)
            job.message, job.state = f"{type(exc).__name__}: {exc}", FAILED
            job.error = type(exc).__name__
            if self._on_fail is not None:
                self._on_fail(job, exc)
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"no job '{job_id}' (the gateway keeps the last {KEEP})", code="job_not_found"
            )
        return job

    def list(self) -> list[Job]:
        with self._lock:
            return list(reversed(self._jobs.values()))
