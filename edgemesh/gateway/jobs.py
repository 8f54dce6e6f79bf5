"""Long management actions (deploy, undeploy, re-plan, drain, remove) as jobs.

A route answers 202 with the job at once and the action runs in a thread;
the page (or the SDK) polls ``GET /api/jobs/{id}``. With a state folder
(``Jobs(path=...)``) the newest ``KEEP`` are saved in ``gateway-jobs.json``
there on every change and read back at start, so a restarted gateway still
lists them; a job that was running when the gateway stopped comes back
failed ("interrupted"), since nothing runs it any more.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgemesh.errors import ConflictError, EdgemeshError, NotFoundError

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED = "running", "done", "failed"
KEEP = 50
JOBS_FILE = "gateway-jobs.json"


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

    def __init__(
        self,
        on_fail: Callable[[Job, Exception], None] | None = None,
        *,
        path: Path | None = None,
    ) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._on_fail = on_fail
        self._path = path
        # One save at a time, snapshot and write together: a slower thread's
        # older snapshot must never replace a newer file.
        self._save_lock = threading.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:  # the history is a convenience
            log.warning("cannot read the saved jobs %s: %s", path, exc)
            return
        names = {f.name for f in fields(Job)}
        for d in saved.get("jobs", []) if isinstance(saved, dict) else []:
            try:
                job = Job(**{k: v for k, v in d.items() if k in names})
            except TypeError:
                continue
            if job.state == RUNNING:
                job.state, job.error = FAILED, "Interrupted"
                job.message = f"interrupted: the gateway stopped during it ({job.message})"
                job.finished = job.finished or job.started
            self._jobs[job.id] = job
        while len(self._jobs) > KEEP:
            self._jobs.popitem(last=False)

    def _save(self) -> None:
        """Write the kept jobs (atomically: a crash leaves the old file)."""
        if self._path is None:
            return
        with self._save_lock:
            with self._lock:
                doc = {"jobs": [j.to_dict() for j in self._jobs.values()]}
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._path.with_name(self._path.name + ".tmp")
                tmp.write_text(json.dumps(doc, default=repr))
                os.replace(tmp, self._path)
            except OSError as exc:  # a full disk must not stop the gateway
                log.warning("cannot save the jobs to %s: %s", self._path, exc)

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
        self._save()
        threading.Thread(target=self._run, args=(job, action), daemon=True).start()
        return job

    def _run(self, job: Job, action: Action) -> None:
        # The state changes last, so a poller that sees a job end also sees
        # its message, its finish time, its failure event and the saved file.
        try:
            message, result = action(job)
            job.message, job.result, state = message, result, DONE
        except Exception as exc:
            # Every failure ends the job with the reason the user must read;
            # an unexpected one is logged with its traceback too.
            if not isinstance(exc, EdgemeshError):
                log.exception("%s of %s failed", job.kind, job.target)
            job.message, state = f"{type(exc).__name__}: {exc}", FAILED
            job.error = type(exc).__name__
            if self._on_fail is not None:
                self._on_fail(job, exc)
        job.finished = time.time()
        job.state = state
        self._save()

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
