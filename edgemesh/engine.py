"""The generation engine: continuous batching over a pipeline of shards.

The engine owns per-sequence state (tokens, position, sampling settings)
and a scheduler thread. Each round it groups the sequences that are not
already in flight into micro-batches — as many as the pipeline has stages,
so every stage has work — submits them, and when a micro-batch comes back
streams the new tokens to their requests. A single box is a pipeline of
depth 1: one batched call per step.

Blocking work (forward) runs on the scheduler thread, never on the event
loop; results reach async callers through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgemesh.backends.base import SeqInput
from edgemesh.errors import (
    ConfigError,
    ContextOverflowError,
    EdgemeshError,
    InferenceError,
    OverloadedError,
)
from edgemesh.limits import ServingLimits
from edgemesh.pipeline import Pick, Picked, Pipeline
from edgemesh.sampling import SamplingParams
from edgemesh.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One step of a generation: new text, and on the last event a reason."""

    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: EdgemeshError | None = None
    logprob: float | None = None
    """log p of ``token_id`` (when the request asked for logprobs)."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely (token id, logprob) at this step, best first."""
    prompt_logprobs: tuple[tuple[float | None, tuple[tuple[int, float], ...]], ...] | None = None
    """``echo``: per prompt token (logprob, top), the first token's logprob None;
    set on the first event only."""


class Constraint(Protocol):
    """An output grammar driven token by token (``edgemesh.grammar``)."""

    def mask(self) -> np.ndarray:
        """Packed uint32 bitmask of the tokens allowed next."""
        ...

    def advance(self, token: int) -> bool:
        """Accept ``token``; True when the grammar is complete (stop here)."""
        ...


EngineConfig = ServingLimits
"""The engine's configuration is the serving limits: it reads ``context_length``,
``max_sequences``, ``max_queue``, ``prefill_chunk`` and ``prefill_budget``."""


@dataclass
class _Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    sink: _Sink
    seed: int
    decoder: StreamDecoder | None
    """None: the engine runs on token ids only (no tokenizer), no text."""
    generated: list[int] = field(default_factory=list)
    counts: Counter[int] = field(default_factory=Counter)
    fed: int = 0
    """Tokens already in the pipeline's KV cache."""
    text: str = ""
    """Decoded but not yet emitted (held back while it may start a stop string)."""
    cancelled: bool = False
    in_flight: bool = False
    chunk: int = 0
    """Tokens to feed in the step being launched (the prefill budget's share)."""
    started: float = field(default_factory=time.monotonic)
    constraint: Constraint | None = None
    echo: bool = False
    """Score the prompt (logprobs of every prompt token, for ``echo``)."""
    prompt_scores: list[tuple[float | None, tuple[tuple[int, float], ...]]] = field(
        default_factory=list
    )
    prompt_sent: bool = False
    followers: list[_Sequence] = field(default_factory=list)
    """Samples of the same prompt held until this one's prompt is cached, then forked."""
    leader: _Sequence | None = None
    last: Picked | None = None
    """The newest token's pick, until an event carries it."""

    @property
    def pending_tokens(self) -> list[int]:
        all_tokens = self.prompt + self.generated
        return all_tokens[self.fed :]


class _Sink:
    """Delivers events to a waiting consumer on any thread or event loop."""

    def __init__(self) -> None:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if self._loop else None
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        if self._loop is not None and self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the consumer's loop is gone: nobody is listening
                pass
        else:
            self._sync.put(event)

    async def aget(self) -> Event:
        assert self._async is not None, "handle was created outside an event loop"
        return await self._async.get()

    def get(self, timeout: float | None = None) -> Event:
        return self._sync.get(timeout=timeout)


class Generation:
    """Handle to one submitted request: iterate events, or cancel."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine = engine
        self._seq = seq
        self.prompt_tokens = len(seq.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self._seq.generated)

    def cancel(self) -> None:
        """Stop generating and free the KV cache everywhere. Idempotent."""
        self._engine._cancel(self._seq)

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                event = await self._seq.sink.aget()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel()

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                event = self._seq.sink.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancel()


class Engine:
    """Continuous-batching decode loop over a pipeline. Thread-safe submit.

    The one decode loop: ``edgemesh serve``, the mesh gateway, ``edgemesh
    generate`` and perplexity (``edgemesh.offline``) all run through it.
    ``tokenizer`` None runs on token ids alone (events carry no text and
    stop strings are refused); ``eos_ids`` overrides the tokenizer's
    end-of-sequence ids (empty: never stop early)."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: Tokenizer | None,
        config: ServingLimits,
        *,
        eos_ids: Iterable[int] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.config = config
        if eos_ids is not None:
            self.eos_ids = frozenset(int(i) for i in eos_ids)
        else:
            self.eos_ids = tokenizer.eos_ids if tokenizer is not None else frozenset()
        self._waiting: deque[_Sequence] = deque()
        self._active: dict[int, _Sequence] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edgemesh-engine", daemon=True)
        self._thread.start()
        self.stats = EngineStats()

    # -- public API -------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        constraint: Constraint | None = None,
        echo: bool = False,
        share_prefill: Generation | None = None,
    ) -> Generation:
        """Queue a request. Raises ContextOverflowError or OverloadedError.

        ``constraint`` masks every step's logits to an output grammar;
        ``echo`` scores the prompt (its logprobs arrive on the first event),
        and with ``params.max_tokens == 0`` nothing is generated.
        ``share_prefill``: another sample of the same prompt, submitted just
        before; this one waits until that one's prompt is in the KV cache and
        gets a copy (``Pipeline.fork``) instead of prefilling again (where the
        pipeline cannot fork, it prefills as usual)."""
        if not prompt:
            raise ContextOverflowError("the prompt is empty", param="prompt")
        if params.stop and self.tokenizer is None:
            raise ConfigError(
                "stop strings need text, and this engine runs on token ids alone",
                hint="open the engine with the model's tokenizer",
            )
        if len(prompt) + params.max_tokens > self.config.context_length:
            raise ContextOverflowError(
                f"this model's context is {self.config.context_length} tokens; the prompt has "
                f"{len(prompt)} tokens and max_tokens is {params.max_tokens}",
                param="max_tokens" if len(prompt) < self.config.context_length else "prompt",
                code="context_length_exceeded",
            )
        seq = _Sequence(
            seq_id=next(self._ids),
            prompt=list(prompt),
            params=params,
            sink=_Sink(),
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            decoder=self.tokenizer.stream_decoder() if self.tokenizer is not None else None,
            constraint=constraint,
            echo=echo,
        )
        if echo:
            seq.prompt_scores.append((None, ()))
        with self._cond:
            if self._stopped:
                raise OverloadedError("the engine is shutting down", retry_after_s=5.0)
            # Free decode slots count as room: the scheduler admits on its next step.
            free = self.config.max_sequences - len(self._active)
            if len(self._waiting) - max(free, 0) >= self.config.max_queue:
                raise OverloadedError(
                    f"{len(self._active)} sequences are running and {len(self._waiting)} "
                    "are waiting; try again shortly",
                    retry_after_s=1.0,
                )
            lead = share_prefill._seq if share_prefill is not None else None
            if (
                lead is not None
                and lead.prompt == seq.prompt
                and lead.fed == 0
                and not lead.cancelled
                and hasattr(self.pipeline, "fork")
            ):
                seq.leader = lead
                lead.followers.append(seq)
            else:
                self._waiting.append(seq)
            self._cond.notify()
        return Generation(self, seq)

    @property
    def load(self) -> dict[str, int]:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting)}

    def kv_used_ratio(self) -> float:
        """KV cache positions the live sequences hold / (max_sequences x context)."""
        with self._cond:
            held = sum(s.fed for s in self._active.values())
        return held / float(self.config.max_sequences * self.config.context_length)

    def close(self, *, pipeline: bool = True) -> None:
        """Stop the scheduler and end every request; ``pipeline=False`` leaves
        the pipeline open (a caller that runs one request at a time over it)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)
        held = [f for s in list(self._active.values()) + list(self._waiting) for f in s.followers]
        for seq in list(self._active.values()) + list(self._waiting) + held:
            seq.sink.put(Event(None, "", "error", OverloadedError("the engine stopped")))
        if pipeline:
            self.pipeline.close()

    # -- scheduler --------------------------------------------------------

    def _cancel(self, seq: _Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
            held = seq.leader is not None and seq in seq.leader.followers
            if held:
                seq.leader.followers.remove(seq)  # type: ignore[union-attr]
            self._cond.notify()
        if held:
            seq.sink.put(Event(None, "", "cancelled"))

    def _run(self) -> None:
        in_flight: dict[cf.Future[list[Picked | None]], tuple[list[_Sequence], list, float]] = {}
        done: deque[cf.Future[list[Picked | None]]] = deque()

        def on_done(future: cf.Future[list[Picked | None]]) -> None:
            with self._cond:
                done.append(future)
                self._cond.notify()

        depth = max(1, getattr(self.pipeline, "depth", 1))
        while True:
            with self._cond:
                while not (self._stopped or done or self._can_launch(len(in_flight), depth)):
                    self._cond.wait()
                if self._stopped:
                    return
                finished = list(done)
                done.clear()
            # Deliver finished micro-batches first: their sequences are ready again
            # and ride in the same step as newly admitted prompts (mixed prefill).
            for future in finished:
                self._complete(*in_flight.pop(future), future)
            with self._cond:
                if self._stopped:
                    return
                self._reap_cancelled()
                while self._waiting and len(self._active) < self.config.max_sequences:
                    seq = self._waiting.popleft()
                    self._active[seq.seq_id] = seq
                ready = self._budgeted([s for s in self._active.values() if not s.in_flight])
                size = math.ceil(len(self._active) / depth) if ready else 0
                batches = []
                while ready and len(in_flight) + len(batches) < depth:
                    batches.append(ready[:size])
                    ready = ready[size:]
                for batch in batches:
                    for seq in batch:
                        seq.in_flight = True
            for batch in batches:
                inputs = self._inputs(batch)
                picks = [self._pick(seq, inp) for seq, inp in zip(batch, inputs, strict=True)]
                started = time.perf_counter()
                future = self.pipeline.submit(inputs, picks)
                in_flight[future] = (batch, inputs, started)
                future.add_done_callback(on_done)

    def _can_launch(self, in_flight: int, depth: int) -> bool:
        if in_flight >= depth:
            return False
        if any(s.cancelled and not s.in_flight for s in self._active.values()):
            return True
        if self._waiting and len(self._active) < self.config.max_sequences:
            return True
        return any(not s.in_flight for s in self._active.values())

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._active.values() if s.cancelled and not s.in_flight]:
            self._finish(seq, "cancelled", lock=False)

    def _budgeted(self, ready: list[_Sequence]) -> list[_Sequence]:
        """``ready`` less the prompts the step's prefill budget has no room for;
        sets each kept sequence's ``chunk``. Admission order is kept, so the
        oldest prompt is fed first and always gets some of the budget."""
        budget = max(1, self.config.prefill_budget)
        kept = []
        for seq in ready:
            pending = len(seq.pending_tokens)
            if pending > 1:
                if budget <= 0:
                    continue
                pending = min(pending, self.config.prefill_chunk, budget)
                budget -= pending
            seq.chunk = pending
            kept.append(seq)
        return kept

    def _inputs(self, batch: list[_Sequence]) -> list[SeqInput]:
        return [
            SeqInput(
                seq.seq_id,
                seq.fed,
                tokens=np.asarray(seq.pending_tokens[: seq.chunk], np.int64),
                logits="all" if seq.echo and seq.fed < len(seq.prompt) else "last",
            )
            for seq in batch
        ]

    def _pick(self, seq: _Sequence, inp: SeqInput) -> Pick | None:
        last_chunk = inp.length >= len(seq.pending_tokens)
        score = None
        if seq.echo and seq.fed < len(seq.prompt):
            # Row i predicts the prompt token after it; the last prompt row predicts
            # the first generated token, which is sampled, not scored.
            score = np.asarray(seq.prompt[seq.fed + 1 : seq.fed + inp.length + 1], np.int64)
        sample = last_chunk and seq.params.max_tokens > 0
        if not sample and score is None:
            return None  # a chunk of a long prompt: no token to choose yet
        penalties = seq.params.presence_penalty or seq.params.frequency_penalty
        return Pick(
            seq.params,
            seq.seed,
            len(seq.generated),
            dict(seq.counts) if penalties else {},
            allowed=seq.constraint.mask() if seq.constraint is not None and sample else None,
            score=score,
            sample=sample,
        )

    def _complete(
        self,
        batch: list[_Sequence],
        inputs: list[SeqInput],
        started: float,
        future: cf.Future[list[Picked | None]],
    ) -> None:
        try:
            picks = future.result()
        except EdgemeshError as exc:
            log.error("a micro-batch of %d sequences failed: %s", len(batch), exc)
            for seq in batch:
                seq.in_flight = False
                self._finish(seq, "error", exc)
            return
        except Exception as exc:
            log.exception("a micro-batch of %d sequences failed", len(batch))
            error = InferenceError(f"inference failed: {exc!r}")
            for seq in batch:
                seq.in_flight = False
                self._finish(seq, "error", error)
            return
        self.stats.record_step(len(batch), time.perf_counter() - started)
        for seq, inp, picked in zip(batch, inputs, picks, strict=True):
            seq.in_flight = False
            seq.fed += inp.length
            if seq.followers and seq.fed >= len(seq.prompt):
                self._fork_followers(seq)  # before _advance may finish and free the cache
            if picked is not None:
                seq.prompt_scores.extend(picked.scored)
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif picked is not None and picked.token is not None:
                self._advance(seq, picked)
            elif seq.params.max_tokens == 0 and seq.fed >= len(seq.prompt):
                self._finish(seq, "length")  # echo only: the prompt is scored

    def _fork_followers(self, lead: _Sequence) -> None:
        """Copy the leader's prompt KV to each held sample with a free slot; the
        sample then feeds only the prompt's last token (its own logits, its own
        pick). The rest prefill as usual. Runs on the scheduler thread."""
        with self._cond:
            followers, lead.followers = lead.followers, []
            room = self.config.max_sequences - len(self._active)
        forked, queued = [], []
        for f in followers:
            f.leader = None
            if room > 0 and self.pipeline.fork(lead.seq_id, f.seq_id):  # type: ignore[attr-defined]
                room -= 1
                f.fed = len(f.prompt) - 1
                if f.echo:
                    f.prompt_scores = list(lead.prompt_scores)
                forked.append(f)
            else:
                queued.append(f)
        with self._cond:
            for f in forked:
                self._active[f.seq_id] = f
            self._waiting.extendleft(reversed(queued))
            self.stats.forks += len(forked)

    def _release_followers(self, lead: _Sequence) -> None:
        """The leader ended before its prompt was cached: its samples prefill themselves."""
        with self._cond:
            followers, lead.followers = lead.followers, []
            for f in followers:
                f.leader = None
            self._waiting.extendleft(reversed(followers))
            self._cond.notify()

    def _advance(self, seq: _Sequence, picked: Picked) -> None:
        params = seq.params
        token = int(picked.token)  # type: ignore[arg-type]
        seq.last = picked
        seq.generated.append(token)
        seq.counts[token] += 1
        self.stats.tokens += 1
        if token in self.eos_ids and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        if seq.decoder is not None:
            seq.text += seq.decoder.feed(token)
        if params.stop and self._hit_stop(seq):
            return
        if seq.constraint is not None and seq.constraint.advance(token):
            seq.text += _flush(seq.decoder)
            self._finish(seq, "stop")  # the grammar is complete
            return
        out_of_room = len(seq.prompt) + len(seq.generated) >= self.config.context_length
        if len(seq.generated) >= params.max_tokens or out_of_room:
            seq.text += _flush(seq.decoder)
            self._finish(seq, "length")
            return
        emit = _safe_prefix(seq.text, params.stop)
        if emit:
            seq.text = seq.text[len(emit) :]
        seq.sink.put(self._event(seq, token, emit))

    def _hit_stop(self, seq: _Sequence) -> bool:
        cut = min((i for s in seq.params.stop if (i := seq.text.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        seq.text = seq.text[:cut]
        self._finish(seq, "stop")
        return True

    def _finish(
        self, seq: _Sequence, reason: str, error: EdgemeshError | None = None, *, lock: bool = True
    ) -> None:
        if lock:
            with self._cond:
                self._active.pop(seq.seq_id, None)
        else:
            self._active.pop(seq.seq_id, None)
        if seq.followers:
            if lock:
                self._release_followers(seq)
            else:  # the caller holds the lock
                for f in seq.followers:
                    f.leader = None
                self._waiting.extendleft(reversed(seq.followers))
                seq.followers = []
        try:
            self.pipeline.release(seq.seq_id)
        except EdgemeshError as exc:  # a vanished box cannot free its cache; nothing to lose
            log.warning("release of sequence %d failed: %s", seq.seq_id, exc)
        last = seq.generated[-1] if seq.generated and reason != "cancelled" else None
        text = seq.text if reason != "cancelled" else ""
        seq.sink.put(self._event(seq, last, text, reason, error))
        seq.text = ""

    def _event(
        self,
        seq: _Sequence,
        token: int | None,
        text: str,
        reason: str | None = None,
        error: EdgemeshError | None = None,
    ) -> Event:
        """An event carrying the newest pick's logprobs once, and on the first
        event the prompt's scores (echo)."""
        picked, seq.last = seq.last, None
        prompt = None
        if seq.echo and not seq.prompt_sent:
            prompt, seq.prompt_sent = tuple(seq.prompt_scores), True
        return Event(
            token,
            text,
            reason,
            error,
            logprob=picked.logprob if picked is not None else None,
            top=picked.top if picked is not None else (),
            prompt_logprobs=prompt,
        )


def _flush(decoder: StreamDecoder | None) -> str:
    return decoder.flush() if decoder is not None else ""


def _safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of ``text`` that cannot be the start of a stop string."""
    if not stops:
        return text
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


@dataclass
class EngineStats:
    """Counters for /metrics and the dashboard (approximate under races)."""

    tokens: int = 0
    steps: int = 0
    forks: int = 0
    """Samples that got a copy of another sample's prompt cache (n > 1)."""
    busy_s: float = 0.0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=256))
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def record_step(self, batch: int, seconds: float) -> None:
        self.steps += 1
        self.busy_s += seconds
        self.batch_sizes.append(batch)
        self.step_times.append(seconds)

    def to_dict(self) -> dict[str, float]:
        recent = list(self.step_times)
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "forks": self.forks,
            "busy_s": round(self.busy_s, 3),
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "mean_step_ms": 1000 * float(np.mean(recent)) if recent else 0.0,
        }
