"""One pipeline stage: a backend on one box, fed micro-batches, batching what waits.

``StageWorker`` is a plain class; the router runs it as a Ray actor pinned
to its box (``edgemesh.router.ray_pipeline``) and tests may run it in
process. It loads its layer range (fetching artifacts if the box lacks
them), then serves ``forward(batch, picks)``: token ids (first stage) or
hidden states in, hidden states (in the wire dtype) or picked token ids
(last stage) out. When several micro-batches wait at a stage (the actor
takes concurrent calls), the first caller runs all of them as one backend
``forward`` call and hands each its share.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh import heap
from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.errors import ConfigError, InferenceError, ModelNotFoundError
from edgemesh.limits import DEFAULT_LIMITS
from edgemesh.mesh.deployment_record import PackageRef, StageInfo
from edgemesh.pipeline import Pick, Picked, apply_picks
from edgemesh.router.artifacts import (
    Source,
    default_cache_root,
    ensure_artifacts,
    local_copy_ok,
    source_reader,
)

log = logging.getLogger(__name__)

WIRE_DTYPES = ("float16", "float32")
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class StageSpec:
    """What one stage runs and where; plain data so it travels to the box."""

    index: int
    box: str
    start: int
    stop: int
    num_layers: int
    backend: str = "onnxruntime"
    precision: str = "fp32"
    wire: str = "float32"
    """dtype of the hidden states this stage sends on (ignored on the last stage)."""
    package_dir: str = ""
    """Where the package may already be on the stage's box; fetched if not intact."""
    cache_root: str | None = None
    threads: int | None = DEFAULT_LIMITS.threads
    context_length: int | None = None
    max_sequences: int = DEFAULT_LIMITS.max_sequences

    def __post_init__(self) -> None:
        if self.wire not in WIRE_DTYPES:
            raise ConfigError(f"wire dtype must be one of {WIRE_DTYPES}, got '{self.wire}'")
        LayerRange(self.start, self.stop)  # validates the range

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.num_layers

    def to_dict(self) -> dict[str, str | int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpec:
        return cls(**d)

    def info(self) -> StageInfo:
        """Where this stage runs, as the records keep it."""
        return StageInfo(self.box, self.start, self.stop, self.backend, self.precision)


def to_wire(hidden: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Hidden states as sent to the next stage, in ``dtype`` where they fit.

    Some residual streams leave fp16's range (Gemma 3 reaches ~82,500 after a
    few layers): such a micro-batch travels at fp32 rather than arriving as
    infinities.
    """
    if dtype == np.float16 and hidden.size and float(np.abs(hidden).max()) > FP16_MAX:
        dtype = np.dtype(np.float32)
    return hidden.astype(dtype, copy=False)


def wire_dtype(sender_precision: str, receiver_precision: str) -> str:
    """fp16 on the wire only where neither side computes at fp32, so an fp32
    pipeline stays token-identical to a single box."""
    return "float32" if "fp32" in (sender_precision, receiver_precision) else "float16"


@dataclass
class Batch:
    """A micro-batch between stages: per-sequence headers plus one packed array.

    ``data`` is ``int64 [sum S]`` token ids into the first stage, or
    ``[sum S, H]`` hidden states (float16/float32) between stages.
    """

    seq_ids: list[int]
    start_pos: list[int]
    lengths: list[int]
    logits: list[str]
    data: np.ndarray
    sent: float = 0.0
    """Wall-clock time the sender let go of it (``time.time()``), for per-hop metrics."""

    @classmethod
    def from_inputs(cls, inputs: Sequence[SeqInput]) -> Batch:
        if any(i.tokens is None for i in inputs):
            raise InferenceError("the first stage takes token ids")
        data = (
            np.concatenate([np.asarray(i.tokens, np.int64) for i in inputs])
            if inputs
            else (np.zeros(0, np.int64))
        )
        return cls(
            [i.seq_id for i in inputs],
            [i.start_pos for i in inputs],
            [i.length for i in inputs],
            [i.logits for i in inputs],
            data,
            time.time(),
        )

    def inputs(self, first: bool) -> list[SeqInput]:
        # Arrays that come out of Ray's object store are read-only views; the
        # backends may write into (or share memory with) what they are given.
        data = self.data if self.data.flags.writeable else self.data.copy()
        out = []
        offset = 0
        for sid, pos, n, lg in zip(
            self.seq_ids, self.start_pos, self.lengths, self.logits, strict=True
        ):
            part = data[offset : offset + n]
            offset += n
            out.append(
                SeqInput(sid, pos, tokens=part, logits=lg)
                if first
                else SeqInput(sid, pos, hidden=part, logits=lg)
            )
        return out

    def with_data(self, data: np.ndarray) -> Batch:
        return Batch(self.seq_ids, self.start_pos, self.lengths, self.logits, data, time.time())

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class _Job:
    batch: Batch
    picks: Sequence[Pick | None] | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Batch | list[Picked | np.ndarray | None] | None = None
    error: BaseException | None = None


class StageWorker:
    """A backend for one layer range; see the module docstring."""

    def __init__(
        self,
        spec: StageSpec,
        package: PackageRef,
        source: Source | None = None,
    ) -> None:
        from edgemesh.backends import registry

        self.spec = spec
        s = self.spec
        self.package_dir, self.fetched = self._package(package, source)
        cls = registry.require_available(s.backend)
        cache = Path(s.cache_root) if s.cache_root else default_cache_root(s.box)
        self.backend = cls(
            ShardSpec(self.package_dir, LayerRange(s.start, s.stop), s.num_layers, s.precision),
            BackendOptions(
                threads=s.threads,
                cache_dir=cache.parent / "ranges",
                context_length=s.context_length,
                max_sequences=s.max_sequences,
            ),
        )
        self.hidden_size = package.manifest.hidden_size  # parsed once, by the driver
        heap.trim()  # what building the sessions freed
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._running = False
        self.calls = 0
        self.merged_calls = 0
        self.busy_s = 0.0
        """Seconds in backend forward calls."""
        self.hops = 0
        self.hop_s = 0.0
        """Sum over micro-batches of arrival here minus departure from the previous
        stage (wall clocks: meaningful where boxes keep NTP time)."""

    def _package(self, package: PackageRef, source: Source | None) -> tuple[Path, bool]:
        s = self.spec
        needed = package.range_files(s.start, s.stop, s.precision)
        if s.package_dir and local_copy_ok(Path(s.package_dir), package, needed):
            return Path(s.package_dir), False
        if source is None:
            raise ModelNotFoundError(
                f"box '{s.box}' has no intact copy of '{package.name}' at "
                f"'{s.package_dir}' and no artifact source was given"
            )
        cache_root = Path(s.cache_root) if s.cache_root else default_cache_root(s.box)
        return ensure_artifacts(package, needed, cache_root, source_reader(source)), True

    # -- actor methods ----------------------------------------------------

    def ready(self) -> StageInfo:
        """Where this stage runs and who runs it (for metrics and status)."""
        return StageInfo(
            self.spec.box,
            self.spec.start,
            self.spec.stop,
            self.spec.backend,
            self.spec.precision,
            host=socket.gethostname(),
            pid=os.getpid(),
            package_dir=str(self.package_dir),
            fetched=self.fetched,
        )

    def stats(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "merged_calls": self.merged_calls,
            "busy_s": self.busy_s,
            "hops": self.hops,
            "hop_s": self.hop_s,
        }

    def forward(
        self, batch: Batch, picks: Sequence[Pick | None] | None = None
    ) -> Batch | list[Picked | np.ndarray | None]:
        """Run one micro-batch; merges with micro-batches waiting at the same time."""
        job = _Job(batch, picks)
        if batch.sent:
            self.hops += 1
            self.hop_s += max(0.0, time.time() - batch.sent)
        with self._cond:
            self._jobs.append(job)
            while self._running and not job.done.is_set():
                self._cond.wait()
            if job.done.is_set():
                return self._result(job)
            self._running = True
        try:
            while True:
                with self._cond:
                    jobs, self._jobs = self._jobs, []
                    if not jobs:
                        self._running = False
                        self._cond.notify_all()
                        break
                self._run(jobs)
                with self._cond:
                    self._cond.notify_all()
        except BaseException:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            raise
        return self._result(job)

    def release(self, seq_ids: Sequence[int]) -> None:
        for sid in seq_ids:
            self.backend.release(int(sid))

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        return self.backend.fork(int(src_seq_id), int(dst_seq_id))

    def close(self) -> None:
        self.backend.close()

    # -- internals --------------------------------------------------------

    @staticmethod
    def _result(job: _Job) -> Batch | list[Picked | np.ndarray | None]:
        if job.error is not None:
            raise job.error
        if job.result is None:
            raise InferenceError("a stage job finished without a result")
        return job.result

    def _run(self, jobs: list[_Job]) -> None:
        self.calls += 1
        self.merged_calls += len(jobs) > 1
        inputs: list[SeqInput] = []
        for job in jobs:
            inputs.extend(job.batch.inputs(self.spec.is_first))
        started = time.perf_counter()
        try:
            outputs = self.backend.forward(inputs)  # [S, H] hidden or [1|S, V] logits each
        except BaseException as exc:
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        finally:
            self.busy_s += time.perf_counter() - started
        at = 0
        for job in jobs:
            n = len(job.batch.seq_ids)
            mine = outputs[at : at + n]
            at += n
            try:
                job.result = self._pack(job, mine)
            except BaseException as exc:
                job.error = exc
            job.done.set()

    def _pack(
        self, job: _Job, outputs: list[np.ndarray]
    ) -> Batch | list[Picked | np.ndarray | None]:
        if self.spec.is_last:
            picks = job.picks if job.picks is not None else [None] * len(outputs)
            picked: list[Picked | np.ndarray | None] = list(apply_picks(outputs, picks))
            # A pooled pass (embeddings) returns its vector [1, H], not a pick.
            for i, kind in enumerate(job.batch.logits):
                if kind == "pooled":
                    picked[i] = outputs[i]
            return picked
        dtype = np.dtype(self.spec.wire)
        if not outputs:
            return job.batch.with_data(np.zeros((0, self.hidden_size), dtype))
        return job.batch.with_data(to_wire(np.concatenate(outputs), dtype))
