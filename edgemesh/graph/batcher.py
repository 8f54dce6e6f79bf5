"""Dynamic batching for one graph: requests that arrive together run as one batch.

Requests queue on the event loop; one worker coroutine takes the first,
then keeps taking queued requests while the batch holds fewer than
``max_batch`` samples, waiting at most ``max_queue_delay_ms`` after the
first (0 = take only what is already queued: no added latency for a lone
request, and batches form by themselves under load because requests queue
while the engine is busy). Requests whose non-batch shapes differ never
share a batch. The batch runs on one dedicated thread (the engine is never
called twice at once), and each request gets its own rows back.

Backpressure: more than ``max_queue`` samples waiting raises
``OverloadedError`` (HTTP 429 + Retry-After) at once instead of queueing
without bound; what is running is not disturbed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgemesh.errors import ConfigError, InferenceError, OverloadedError

Feeds = dict[str, np.ndarray]
RunFn = Callable[[Feeds], list[np.ndarray]]


@dataclass(frozen=True)
class BatchingOptions:
    max_batch: int = 8
    max_queue_delay_ms: float = 0.0
    max_queue: int = 64
    """Samples waiting (not yet running) before new requests get 429."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_queue_delay_ms < 0:
            raise ConfigError(
                f"batching needs max_batch >= 1, max_queue >= 1, max_queue_delay_ms >= 0; got "
                f"{self.max_batch}, {self.max_queue}, {self.max_queue_delay_ms}"
            )


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    samples: int = 0
    rejected: int = 0
    compute_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "samples": self.samples,
            "rejected": self.rejected,
            "mean_batch": round(self.samples / self.batches, 3) if self.batches else 0.0,
            "mean_compute_ms": round(1e3 * self.compute_s / self.batches, 3)
            if self.batches
            else 0.0,
        }


@dataclass
class _Pending:
    feeds: Feeds
    rows: int
    key: tuple
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Batches ``run`` calls; ``submit`` is a coroutine, ``run`` blocks (own thread)."""

    def __init__(self, run: RunFn, options: BatchingOptions, *, batchable: bool) -> None:
        self._run = run
        self.options = options
        self.batchable = batchable
        """False when an input has a fixed batch axis: every request runs alone."""
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._waiting_rows = 0
        self._running_rows = 0
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="graph-run")
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Samples waiting plus running: what a load balancer compares."""
        return self._waiting_rows + self._running_rows

    async def submit(self, feeds: Feeds) -> list[np.ndarray]:
        if self._closed:
            raise InferenceError("the model is shutting down")
        rows = int(next(iter(feeds.values())).shape[0]) if self.batchable and feeds else 1
        if self._waiting_rows + rows > self.options.max_queue:
            self.stats.rejected += 1
            raise OverloadedError(
                f"{self._waiting_rows} samples are queued (max {self.options.max_queue}); "
                "retry later",
                retry_after_s=self._retry_after(),
            )
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feeds.items()))
        item = _Pending(feeds, rows, key, loop.create_future())
        self._queue.append(item)
        self._waiting_rows += rows
        self.stats.requests += 1
        assert self._wake is not None
        self._wake.set()
        return await item.future

    def _retry_after(self) -> float:
        per_row = self.stats.compute_s / max(self.stats.samples, 1)
        return max(1.0, per_row * self._waiting_rows)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while not self._closed:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = await self._gather()
            rows = sum(p.rows for p in batch)
            self._waiting_rows -= rows
            self._running_rows = rows
            feeds = (
                batch[0].feeds
                if len(batch) == 1
                else {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            )
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._pool, self._run, feeds)
            except Exception as exc:  # delivered to every caller of the batch
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._running_rows = 0
                self.stats.compute_s += time.perf_counter() - start
            self.stats.batches += 1
            self.stats.samples += rows
            offset = 0
            for p in batch:
                if not p.future.done():  # a cancelled request just drops its rows
                    if len(batch) == 1:
                        p.future.set_result(outputs)
                    else:
                        p.future.set_result([o[offset : offset + p.rows] for o in outputs])
                offset += p.rows

    async def _gather(self) -> list[_Pending]:
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        if not self.batchable:
            return batch
        deadline = time.perf_counter() + self.options.max_queue_delay_ms / 1e3
        while rows < self.options.max_batch:
            if not self._queue:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                assert self._wake is not None
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
                continue
            nxt = self._queue[0]
            if nxt.key != first.key or rows + nxt.rows > self.options.max_batch:
                break
            batch.append(self._queue.popleft())
            rows += nxt.rows
        return batch

    def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(InferenceError("the model is shutting down"))
        self._queue.clear()
        self._pool.shutdown(wait=True)
