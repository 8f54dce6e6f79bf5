"""``RayPipeline``: the engine's ``Pipeline`` over stage actors on the mesh's boxes.

One ``StageWorker`` actor per stage, pinned to its box by the box's custom
resource (``box:<id>``). A micro-batch is a chain of actor calls whose
ObjectRefs are passed stage to stage, so hidden states go box to box and
never back through the driver; the picks go straight to the last stage,
which returns only token ids. ``depth`` is the number of stages: the engine
keeps that many micro-batches in flight so every stage has work.

The router remembers the tokens each live sequence has been fed through
the whole pipeline. When a call fails because an actor or its box died,
the pipeline stops launching, waits for the micro-batches in flight to
settle, asks its ``Placer`` for stages over the boxes still alive (a
re-plan), keeps the surviving stage actors whose work did not change,
starts the rest, replays every live sequence's tokens to rebuild the KV
caches, and re-runs the failed micro-batches. The engine sees a slow step,
not an error; since a failed micro-batch's tokens were never delivered,
none is lost or duplicated. If no placement fits, every waiting and future
call fails with ``ModelUnavailableError`` (HTTP 503).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemesh.backends.base import SeqInput
from edgemesh.errors import (
    EdgemeshError,
    InferenceError,
    ModelUnavailableError,
    require,
)
from edgemesh.limits import DEFAULT_LIMITS
from edgemesh.mesh.deployment_record import JSONObject, PackageRef, StageInfo
from edgemesh.pipeline import Pick, Picked
from edgemesh.router.artifacts import Source
from edgemesh.router.placement import Placer
from edgemesh.router.stage import Batch, StageSpec, StageWorker

log = logging.getLogger(__name__)

STAGE_CONCURRENCY = 8
"""Concurrent calls a stage actor accepts, so waiting micro-batches can be merged."""


@dataclass
class _Job:
    inputs: list[SeqInput]
    picks: list[Pick | None]
    future: cf.Future[list[Picked | None]]


def _is_loss(ray: Any, exc: BaseException) -> bool:
    """Did the call fail because a stage's process or box went away?"""
    e = ray.exceptions
    kinds = tuple(
        getattr(e, n)
        for n in (
            "RayActorError",
            "ActorUnavailableError",
            "ObjectLostError",
            "NodeDiedError",
            "WorkerCrashedError",
            "OwnerDiedError",
            "GetTimeoutError",
        )
        if hasattr(e, n)
    )
    return isinstance(exc, (*kinds, StageBoxLost))


class StageBoxLost(Exception):
    """A box left while its stage was starting (handled like any stage loss)."""


def _unwrap(exc: BaseException) -> BaseException:
    """A stage's own error (InferenceError, ...) out of Ray's task-error wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayPipeline:
    """See the module docstring. Thread-safe; ``submit`` never blocks on Ray."""

    def __init__(
        self,
        placer: Placer,
        package: PackageRef,
        *,
        source: Source | None = None,
        prefill_chunk: int = DEFAULT_LIMITS.prefill_chunk,
        ready_timeout_s: float = 600.0,
        settle_timeout_s: float = 60.0,
        max_recoveries: int = 5,
    ) -> None:
        self._ray = require("ray", "mesh")
        self.placer = placer
        self.package = package
        self.source = source
        self.prefill_chunk = prefill_chunk
        self.ready_timeout_s = ready_timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.max_recoveries = max_recoveries
        self._cond = threading.Condition()
        self._history: dict[int, list[int]] = {}
        self._retry: list[_Job] = []
        self._inflight = 0
        self._recovering = False
        self._broken: EdgemeshError | None = None
        self._closed = False
        self.recoveries = 0
        self.replans = 0
        self.replayed_tokens = 0
        self.last_recovery_s = 0.0
        self.on_change: Callable[[list[StageInfo]], None] | None = None
        """Called with where the stages run after a recovery or a move."""
        specs = placer.initial()
        alive = self._alive_boxes()
        if any(s.box not in alive for s in specs):
            # A recorded plan restored after a head change may name lost boxes.
            specs = placer.after_loss(alive)
        self.depth = len(specs)
        self._specs, self._actors, self.stage_info = self._start(specs, {})

    # -- Pipeline protocol --------------------------------------------------

    def submit(
        self, inputs: Sequence[SeqInput], picks: Sequence[Pick | None]
    ) -> cf.Future[list[Picked | None]]:
        future: cf.Future[list[Picked | None]] = cf.Future()
        job = _Job(list(inputs), list(picks), future)
        with self._cond:
            if self._broken is not None:
                future.set_exception(self._broken)
            elif self._closed:
                future.set_exception(InferenceError("the pipeline is closed"))
            elif self._recovering:
                self._retry.append(job)  # runs once the stages are back
            else:
                self._launch(job)
        return future

    def release(self, seq_id: int) -> None:
        with self._cond:
            self._history.pop(seq_id, None)
            actors = list(self._actors)
        refs = [actor.release.remote([seq_id]) for actor in actors]
        # Wait (briefly) so the freed KV slot is free before the engine admits the
        # next sequence: stages accept calls concurrently, so a new sequence's
        # forward could otherwise overtake this release and find every slot busy.
        # A dead box has nothing to free: its error is not waited for or raised.
        self._ray.wait(refs, num_returns=len(refs), timeout=5.0)

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        """Copy a sequence's KV cache on every stage (and its replay history)."""
        with self._cond:
            if self._recovering or self._broken is not None or self._closed:
                return False
            actors = list(self._actors)
            history = list(self._history.get(src_seq_id, []))
        try:
            ok = self._ray.get([a.fork.remote(src_seq_id, dst_seq_id) for a in actors], timeout=30)
        except Exception as exc:  # a stage lost mid-fork: prefill instead
            log.info("fork of sequence %d failed: %r", src_seq_id, exc)
            ok = [False]
        if not all(ok):
            self._ray.wait([a.release.remote([dst_seq_id]) for a in actors], timeout=5.0)
            return False
        with self._cond:
            self._history[dst_seq_id] = history
        return True

    def pooled(self, inputs: Sequence[SeqInput], timeout: float = 300.0) -> list[np.ndarray]:
        """Run pooled passes (``logits == "pooled"``, embeddings) through the stages:
        the last returns each input's pooled hidden state ``[1, H]``. Blocking;
        a pass caught by a stage loss is re-run once the stages are back."""
        if any(i.logits != "pooled" for i in inputs):
            raise InferenceError("RayPipeline.pooled takes pooled passes only")
        return self.submit(inputs, [None] * len(inputs)).result(timeout)  # type: ignore[return-value]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            actors, self._actors = self._actors, []
        self._kill(actors)

    # -- what runs where ----------------------------------------------------

    @property
    def specs(self) -> list[StageSpec]:
        return list(self._specs)

    def stages(self) -> list[StageInfo]:
        """Per stage: box, layers, backend, precision, host and pid."""
        with self._cond:
            return list(self.stage_info)

    def describe(self) -> list[JSONObject]:
        """``stages()`` as JSON (for metrics and the dashboard)."""
        return [info.to_dict() for info in self.stages()]

    def stage_stats(self, timeout: float = 5.0) -> list[dict[str, float]]:
        return self._ray.get([a.stats.remote() for a in self._actors], timeout=timeout)

    def stage_timings(self) -> list[JSONObject]:
        """Per stage: box, forward calls and seconds, and the hop into it (for /metrics).
        Counters restart when a stage actor is replaced (Prometheus sees a reset)."""
        with self._cond:
            specs = list(self._specs)
        stats = self.stage_stats(timeout=2.0)
        return [
            {"stage": spec.index, "box": spec.box, **st}
            for spec, st in zip(specs, stats, strict=False)
        ]

    # -- launching ----------------------------------------------------------

    def _launch(self, job: _Job) -> None:
        """Chain one micro-batch through the stages (caller holds the lock)."""
        actors = self._actors
        ref: Any = Batch.from_inputs(job.inputs)
        for actor in actors[:-1]:
            ref = actor.forward.remote(ref)
        ref = actors[-1].forward.remote(ref, job.picks)
        self._inflight += 1
        ref.future().add_done_callback(lambda f: self._done(job, f))

    def _done(self, job: _Job, f: cf.Future[Any]) -> None:
        exc = f.exception()
        retrying = False
        with self._cond:
            self._inflight -= 1
            if exc is None:
                self._record(job.inputs)
            elif _is_loss(self._ray, exc) and not self._closed and self._broken is None:
                log.warning("a stage was lost (%s); recovering", type(exc).__name__)
                retrying = True
                self._retry.append(job)
                if not self._recovering:
                    self._recovering = True
                    threading.Thread(
                        target=self._recover, name="edgemesh-recover", daemon=True
                    ).start()
            self._cond.notify_all()
        if exc is None:
            job.future.set_result(f.result())
        elif not retrying:
            cause = _unwrap(exc)
            if not isinstance(cause, EdgemeshError):
                cause = InferenceError(f"a pipeline stage failed: {cause!r}")
                cause.__cause__ = exc
            job.future.set_exception(cause)

    def _record(self, inputs: list[SeqInput]) -> None:
        for inp in inputs:
            if inp.logits == "pooled":
                continue  # stateless (embeddings): nothing to replay
            hist = self._history.get(inp.seq_id)
            if hist is None:
                if inp.start_pos:
                    continue  # released while in flight
                hist = self._history[inp.seq_id] = []
            del hist[inp.start_pos :]
            assert inp.tokens is not None
            hist.extend(int(t) for t in inp.tokens)

    # -- membership -----------------------------------------------------------

    def consider_join(self) -> bool:
        """Re-place the stages if the placer finds a better plan with the boxes
        alive now (a box joined). Blocks while the stages move: launches pause,
        in-flight micro-batches finish, new stages start, live sequences are
        replayed, then launches resume. Returns whether the stages moved."""
        with self._cond:
            if self._recovering or self._broken is not None or self._closed:
                return False
            alive = self._alive_boxes()
            specs = self.placer.after_join(alive)
            if specs is None:
                return False
            self._recovering = True
        log.warning("a better placement is available; moving stages")
        self._recover(planned=specs)
        return True

    def move(self, specs: list[StageSpec]) -> bool:
        """Move to ``specs`` (a re-plan or a drain from the dashboard) the way
        a join does: launches pause, in-flight micro-batches finish, the new
        stages start, live sequences are replayed onto them, launches resume;
        no stream is cut. Returns False when the pipeline is busy recovering,
        broken or closed (nothing moved)."""
        with self._cond:
            if self._recovering or self._broken is not None or self._closed:
                return False
            self._recovering = True
        self._recover(planned=specs)
        with self._cond:
            return self._broken is None

    # -- recovery -----------------------------------------------------------

    def _recover(self, planned: list[StageSpec] | None = None) -> None:
        """Settle, re-place, replay, resume. ``planned``: stages chosen ahead
        (a join); otherwise (or if they fail to start) the placer re-plans
        over the boxes still alive (a loss)."""
        t0 = time.monotonic()
        attempts = 0
        while True:
            with self._cond:
                deadline = time.monotonic() + self.settle_timeout_s
                while self._inflight and time.monotonic() < deadline:
                    self._cond.wait(timeout=0.5)
                history = {k: list(v) for k, v in self._history.items() if v}
                old_specs, old_actors = list(self._specs), list(self._actors)
            try:
                if planned is not None and attempts == 0:
                    specs = planned
                else:
                    specs = self.placer.after_loss(
                        self._alive_boxes(probe={s.box for s in old_specs})
                    )
                keep = self._survivors(old_specs, old_actors, specs)
                new_specs, actors, info = self._start(specs, keep)
                try:
                    self._replay(actors, history)
                except BaseException:
                    # Another box went while replaying: drop what was just
                    # started; the next attempt starts from the old stages.
                    self._kill([a for i, a in enumerate(actors) if i not in keep])
                    raise
                self._kill([a for a in old_actors if all(a is not k for k in keep.values())])
            except EdgemeshError as exc:
                if not isinstance(exc, ModelUnavailableError):
                    exc = ModelUnavailableError(f"the model cannot be served: {exc}")
                self._fail_all(exc)
                return
            except Exception as exc:
                attempts += 1
                if planned is not None and attempts == 1 and _is_loss(self._ray, exc):
                    planned = None  # a box of the new plan failed: fall back to a re-plan
                    log.warning("the new placement failed to start (%r); re-planning", exc)
                    continue
                if not _is_loss(self._ray, exc) or attempts > self.max_recoveries:
                    self._fail_all(
                        ModelUnavailableError(f"recovering the pipeline failed: {exc!r}")
                    )
                    return
                log.warning("lost another stage while recovering (%r); retrying", exc)
                continue
            with self._cond:
                self._specs, self._actors, self.stage_info = new_specs, actors, info
                self._recovering = False
                if planned is not None and attempts == 0:
                    self.replans += 1
                else:
                    self.recoveries += 1
                self.last_recovery_s = time.monotonic() - t0
                retry, self._retry = self._retry, []
                for job in retry:
                    self._launch(job)
            if self.on_change is not None:
                self.on_change(self.stages())
            log.warning(
                "stages placed again in %.1f s: %d sequences replayed, %d micro-batches re-run",
                self.last_recovery_s,
                len(history),
                len(retry),
            )
            return

    def _fail_all(self, exc: EdgemeshError) -> None:
        with self._cond:
            self._broken = exc
            self._recovering = False
            retry, self._retry = self._retry, []
        log.error("pipeline unavailable: %s", exc)
        for job in retry:
            job.future.set_exception(exc)

    def _alive_boxes(self, probe: set[str] | frozenset[str] = frozenset()) -> set[str]:
        """Boxes with an alive Ray node; those in ``probe`` must also have a
        raylet that accepts a TCP connection.

        A call fails the moment a box's processes die, but the head marks its
        node dead only after several missed health checks; planning before
        that would put a stage on the dead box again. A refused (or silent)
        raylet port tells at once. A stage actor that died alone leaves its
        box's raylet answering, so that box stays usable."""
        from edgemesh.mesh.ray_node import tcp_reachable

        alive: set[str] = set()
        for node in self._ray.nodes():
            if not node.get("Alive"):
                continue
            boxes = {k[4:] for k in node.get("Resources", {}) if k.startswith("box:")}
            if boxes & probe:
                where = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
                if not tcp_reachable(where, timeout=1.0):
                    log.info("box(es) %s: raylet %s does not answer", sorted(boxes), where)
                    continue
            alive |= boxes
        return alive

    def _survivors(
        self, old_specs: list[StageSpec], old_actors: list[Any], specs: list[StageSpec]
    ) -> dict[int, Any]:
        """New stage index -> an old actor doing exactly that work and still answering."""
        keep: dict[int, Any] = {}
        for i, spec in enumerate(specs):
            for old, actor in zip(old_specs, old_actors, strict=True):
                if old.to_dict() | {"index": i} == spec.to_dict():
                    try:
                        self._ray.get(actor.ready.remote(), timeout=5)
                        keep[i] = actor
                    except Exception as exc:
                        log.info("stage %d on %s is gone: %r", old.index, old.box, exc)
                    break
        return keep

    def _start(
        self, specs: list[StageSpec], keep: dict[int, Any]
    ) -> tuple[list[StageSpec], list[Any], list[StageInfo]]:
        ray = self._ray
        remote = ray.remote(StageWorker)
        actors = []
        for i, spec in enumerate(specs):
            if i in keep:
                actors.append(keep[i])
                continue
            actors.append(
                remote.options(
                    resources={f"box:{spec.box}": 0.001},
                    num_cpus=0,
                    max_concurrency=STAGE_CONCURRENCY,
                    max_restarts=0,
                ).remote(spec, self.package, self.source)
            )
        try:
            info = self._wait_ready(specs, actors)
        except BaseException as exc:
            self._kill([a for i, a in enumerate(actors) if i not in keep])
            cause = _unwrap(exc)
            if isinstance(cause, EdgemeshError):
                raise cause from exc
            raise
        for spec, stage in zip(specs, info, strict=True):
            log.info(
                "stage %d: layers %s on box %s (pid %s)",
                spec.index,
                list(stage.layers),
                spec.box,
                stage.pid,
            )
        return list(specs), actors, list(info)

    def _wait_ready(self, specs: list[StageSpec], actors: list[Any]) -> list[StageInfo]:
        """Every stage's ``ready()``; raises ``StageBoxLost`` as soon as a box
        a stage waits for leaves (its actor would otherwise pend forever:
        no other node carries that box's resource)."""
        ray = self._ray
        refs = [a.ready.remote() for a in actors]
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            if not pending:
                return ray.get(refs)
            waiting = {specs[i].box for i, r in enumerate(refs) if r in pending}
            gone = waiting - self._alive_boxes(probe=waiting)
            if gone:
                raise StageBoxLost(f"box(es) {', '.join(sorted(gone))} left while starting")
            if time.monotonic() > deadline:
                raise ray.exceptions.GetTimeoutError(
                    f"stages on {', '.join(sorted(waiting))} not ready after "
                    f"{self.ready_timeout_s:.0f} s"
                )

    def _kill(self, actors: list[Any]) -> None:
        for actor in actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception as exc:  # already dead: nothing to stop
                log.debug("kill of a stage actor: %r", exc)

    def _replay(self, actors: list[Any], history: dict[int, list[int]]) -> None:
        """Feed every live sequence its tokens again, from position 0, chunk by chunk."""
        if not history:
            return
        longest = max(len(v) for v in history.values())
        for begin in range(0, longest, self.prefill_chunk):
            inputs = [
                SeqInput(sid, begin, tokens=np.asarray(toks[begin : begin + self.prefill_chunk]))
                for sid, toks in history.items()
                if len(toks) > begin
            ]
            ref: Any = Batch.from_inputs(inputs)
            for actor in actors[:-1]:
                ref = actor.forward.remote(ref)
            self._ray.get(actors[-1].forward.remote(ref, None), timeout=self.ready_timeout_s)
            self.replayed_tokens += sum(i.length for i in inputs)
