"""Batched decode for the ONNX-path engines: one forward over many sequences.

``RangeGraphBackend`` is the base of every backend that runs a composed
range graph (onnxruntime, OpenVINO, TensorRT). A subclass supplies four
runtime primitives (run the graph, KV tensor to/from the host, an empty KV
tensor); this class owns the sequences' KV caches and decides how a
``forward`` call is cut into graph runs:

* **decode rows** (one new token each, the steady state of every stream)
  run as **one padded batch** ``[B, 1]``. Their caches live together in a
  *group*: per layer one ``[B, KV, T, D]`` tensor, row b = one sequence,
  left-padded so every row's newest slot is the last (``key_pos [B, T]``
  says which position each slot holds; ``-1`` = padding, masked by the
  graph). A group whose members come back together runs with no copy at
  all: the graph's ``present`` tensors are bound as the next call's
  ``past``. When the set of decode rows changes (a stream joins, leaves or
  is sent in another micro-batch), the group is re-laid once on the host.
* **prompt chunks** (several new tokens) run one sequence at a time
  (``[1, S]``) on the sequence's own cache: prefill is compute bound, so
  padding a chunk of 64 tokens against 1-token rows would multiply the
  work for nothing. The engine feeds prompts in chunks (its prefill
  budget), so a long prompt costs the running streams one chunk per step.

Memory: every cached token is stored once (its sequence's own cache, or
one row of one group); a group never keeps rows of released sequences
(``release`` compacts it), so the cache is bounded by ``max_sequences`` x
``context_length`` tokens, the figure the planner reserves per box.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgemesh.backends.admission import RangeInputs, admit
from edgemesh.backends.base import Backend, BackendOptions, SeqInput, ShardSpec
from edgemesh.errors import ConfigError, InferenceError, RequestError

KV = Any
"""A runtime's KV tensor ``[B, KV, T, D]`` float32 (OrtValue, ov.Tensor, torch CUDA tensor)."""


@dataclass
class _Group:
    """Sequences whose caches are rows of one batched KV tensor per layer."""

    ids: list[int]
    kv: list[KV]  # per (layer, key|value): [B, KV, T, D]
    key_pos: np.ndarray  # int64 [B, T]; -1 = padding

    @property
    def slots(self) -> int:
        return int(self.key_pos.shape[1])


@dataclass
class _Seq:
    length: int = 0
    """Tokens in the cache = the position of the next token."""
    kv: list[KV] | None = None
    """Its own cache ``[1, KV, length, D]`` per (layer, key|value), unless in a group."""
    group: _Group | None = field(default=None, repr=False)


class RangeGraphBackend(Backend):
    """A layer range of an edgemesh package on a runtime that runs ONNX graphs.

    Subclasses implement ``_run_graph``, ``_kv_host``, ``_kv_device``,
    ``_kv_empty`` and ``_free``; ``label`` names the runtime in errors.
    Calls are serialized: a runtime session is not safe to run from two
    threads on the same KV state.
    """

    label: ClassVar[str]
    max_new_tokens: ClassVar[int | None] = None
    """Longest S one graph run may take (a compiled profile's limit); prompts are cut."""
    can_pool: bool = False
    """The last range's graph has ``hidden_norm`` (``SeqInput.logits == "pooled"``
    works); a subclass sets it once its graph is loaded. Non-last ranges pool
    nothing themselves: a pooled pass only runs through them."""

    def __init__(self, shard: ShardSpec, options: BackendOptions | None = None) -> None:
        super().__init__(shard, options)
        self._seqs: dict[int, _Seq] = {}
        self._groups: list[_Group] = []
        self._lock = threading.Lock()
        self._closed = False
        self.graph_runs = 0
        """Graph executions so far (a batched decode step counts once)."""

    # -- the runtime's part ---------------------------------------------------

    @abstractmethod
    def _run_graph(
        self, feeds: dict[str, np.ndarray], past: list[KV], main: str | None = None
    ) -> tuple[np.ndarray, list[KV]]:
        """Run the range graph once: host ``feeds`` (every input but the KV) and
        the ``past`` tensors, in layer order (key, value). Returns the main
        output on the host (``[B, S, H]`` hidden or ``[B, K, V]`` logits,
        float32; ``main`` names another output to return instead, asked only
        where ``can_pool``: ``hidden_norm``) and the ``present`` tensors, kept
        on the runtime's device."""

    @abstractmethod
    def _kv_host(self, kv: KV) -> np.ndarray:
        """A KV tensor as a host float32 array ``[B, KV, T, D]``."""

    @abstractmethod
    def _kv_device(self, array: np.ndarray) -> KV:
        """A contiguous host float32 array ``[B, KV, T, D]`` as a KV tensor."""

    @abstractmethod
    def _kv_empty(self, batch: int) -> KV:
        """A zero-length past ``[batch, KV, 0, D]``."""

    @abstractmethod
    def _kv_nbytes(self, kv: KV) -> int:
        """Bytes one KV tensor holds."""

    @abstractmethod
    def _free(self) -> None:
        """Drop the runtime's session/engine objects (close, under the lock)."""

    # -- contract -------------------------------------------------------------

    def forward(self, batch: Sequence[SeqInput]) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise InferenceError(f"the {self.label} backend is closed")
            self._admit(batch)
            out: list[np.ndarray | None] = [None] * len(batch)
            decode = []
            for i, item in enumerate(batch):
                if item.logits == "pooled":
                    out[i] = self._pooled(item)
                    continue
                seq = self._seqs.setdefault(item.seq_id, _Seq())
                if item.start_pos < seq.length:
                    # A replay: keep the first start_pos cached tokens.
                    self._truncate(item.seq_id, item.start_pos)
                if item.length == 1:
                    decode.append(i)
                else:
                    out[i] = self._prompt(item)
            if decode:
                for i, o in zip(decode, self._decode([batch[i] for i in decode]), strict=True):
                    out[i] = o
            return [o for o in out if o is not None]

    def release(self, seq_id: int) -> None:
        with self._lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is not None and seq.group is not None:
                self._regroup(seq.group, keep=[i for i in seq.group.ids if i != seq_id])

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        """``dst`` starts with a copy of ``src``'s cache (its own tensors; it joins a
        decode group on its first decode step). False when ``src`` is unknown,
        ``dst`` exists or every slot is taken."""
        with self._lock:
            seq = self._seqs.get(src_seq_id)
            busy = len(self._seqs) >= self.max_sequences or dst_seq_id in self._seqs
            if self._closed or seq is None or busy:
                return False
            copy = _Seq(length=seq.length)
            if seq.length:
                cache = self._rows(src_seq_id, {})
                copy.kv = [self._kv_device(np.array(c[None], np.float32)) for c in cache]
            self._seqs[dst_seq_id] = copy
            return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._seqs.clear()
            self._groups.clear()
            self._free()

    def kv_bytes(self) -> int:
        """Bytes held in KV tensors (each sequence's own and the groups'), on
        the runtime's device (GPU memory there, which the process RSS does not show)."""
        with self._lock:
            own = sum(self._kv_nbytes(t) for s in self._seqs.values() if s.kv for t in s.kv)
            return own + sum(self._kv_nbytes(t) for g in self._groups for t in g.kv)

    # -- shared setup ---------------------------------------------------------

    def _open_range(self) -> Any:
        """Open the shard's package and read what a range needs from its
        manifest: ``hidden_size``, ``vocab_size``, ``_kv_heads``, ``_head_dim``,
        ``context_length`` (the option, capped by the model), ``max_sequences``,
        ``_first``/``_last`` and ``_layers``. Returns the ``Package``."""
        from edgemesh.sharding.package.folder import open_package

        shard = self.shard
        package = open_package(shard.model)
        manifest = package.manifest
        if package.num_layers != shard.num_layers:
            raise ConfigError(
                f"shard says {shard.num_layers} layers but '{shard.model}' has {package.num_layers}"
            )
        package.check_range(shard.layers.start, shard.layers.stop, shard.precision)
        self.hidden_size = manifest.hidden_size
        self.vocab_size = manifest.vocab_size
        self._kv_heads = int(manifest.extra["kv_heads"])
        self._head_dim = int(manifest.extra["head_dim"])
        self.context_length = min(
            self.options.context_length or manifest.context_length, manifest.context_length
        )
        self.max_sequences = max(1, self.options.max_sequences)
        self._first, self._last = shard.is_first, shard.is_last
        self._layers = list(range(shard.layers.start, shard.layers.stop))
        return package

    # -- checks (all before anything changes, so a refused call leaves nothing) --

    def _admit(self, batch: Sequence[SeqInput]) -> None:
        if self._last and not self.can_pool and any(i.logits == "pooled" for i in batch):
            raise RequestError(
                f"this package's graph of layers {self.shard.layers} has no hidden_norm output "
                "(converted before edgemesh exported it), so it serves no embeddings; "
                "re-convert it with `edgemesh convert`",
                param="model",
                code="embeddings_unsupported",
            )
        accepts = RangeInputs(
            self.shard.layers,
            self._first,
            self.hidden_size,
            self.context_length,
            self.max_sequences,
            pools=True,
        )
        admit(batch, accepts, self._cached, len(self._seqs))

    def _cached(self, seq_id: int) -> int | None:
        seq = self._seqs.get(seq_id)
        return None if seq is None else seq.length

    # -- feeds ----------------------------------------------------------------

    def _data(self, items: Sequence[SeqInput], rows: int) -> dict[str, np.ndarray]:
        """``input_ids [B, S]`` or ``hidden_in [B, S, H]`` for same-length items;
        rows past ``len(items)`` (none today) would be zeros."""
        n = items[0].length
        if self._first:
            ids = np.zeros((rows, n), np.int64)
            for r, item in enumerate(items):
                ids[r] = np.asarray(item.tokens, np.int64)
            return {"input_ids": ids}
        hidden = np.zeros((rows, n, self.hidden_size), np.float32)
        for r, item in enumerate(items):
            hidden[r] = item.hidden
        return {"hidden_in": hidden}

    def _run(
        self, feeds: dict[str, np.ndarray], past: list[KV], where: str, main: str | None = None
    ) -> tuple:
        try:
            out = self._run_graph(feeds, past, main) if main else self._run_graph(feeds, past)
        except InferenceError:
            raise
        except Exception as exc:  # each runtime raises its own exception types
            raise InferenceError(
                f"{self.label} failed on layers {self.shard.layers} {where}: {exc}"
            ) from exc
        self.graph_runs += 1
        return out

    # -- prompt chunks: one sequence, its own cache ------------------------------

    def _prompt(self, item: SeqInput) -> np.ndarray:
        seq = self._own(item.seq_id)
        data = item.tokens if self._first else item.hidden
        assert data is not None and seq.kv is not None
        step = self.max_new_tokens or item.length
        outs = []
        for begin in range(0, item.length, step):
            part = data[begin : begin + step]
            n = int(part.shape[0])
            pos = item.start_pos + begin
            piece = SeqInput(item.seq_id, pos, tokens=part) if self._first else (
                SeqInput(item.seq_id, pos, hidden=part))  # fmt: skip
            feeds = self._data([piece], 1)
            feeds["position_ids"] = np.arange(pos, pos + n, dtype=np.int64)[None]
            feeds["key_position"] = np.arange(pos + n, dtype=np.int64)[None]
            final = begin + n >= item.length
            if self._last:
                rows = np.arange(n) if item.logits == "all" else np.array([n - 1])
                feeds["logit_index"] = rows.astype(np.int64)
            main, seq.kv = self._run(feeds, seq.kv, f"at position {pos}")
            seq.length = pos + n
            if not self._last or item.logits == "all" or final:
                outs.append(main[0])
        if self._last and item.logits != "all":
            return np.ascontiguousarray(outs[-1], dtype=np.float32)  # [1, V]
        return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)  # [S, H] or [S, V]

    # -- pooled passes: embeddings, no state ---------------------------------------

    def _pooled(self, item: SeqInput) -> np.ndarray:
        """Run ``item`` from an empty past and keep nothing: the last range returns
        the mean over its rows of the final norm's output ``[1, H]`` (chunks of
        ``max_new_tokens`` summed, so the mean is over all S), the others their
        hidden states ``[S, H]`` for the next range."""
        data = item.tokens if self._first else item.hidden
        assert data is not None
        past = [self._kv_empty(1) for _ in range(2 * len(self._layers))]
        step = self.max_new_tokens or item.length
        total = np.zeros(self.hidden_size, np.float64)  # [H]
        outs = []
        for begin in range(0, item.length, step):
            part = data[begin : begin + step]
            n = int(part.shape[0])
            piece = SeqInput(item.seq_id, begin, tokens=part) if self._first else (
                SeqInput(item.seq_id, begin, hidden=part))  # fmt: skip
            feeds = self._data([piece], 1)
            feeds["position_ids"] = np.arange(begin, begin + n, dtype=np.int64)[None]
            feeds["key_position"] = np.arange(begin + n, dtype=np.int64)[None]
            where = f"pooling at position {begin}"
            if self._last:
                feeds["logit_index"] = np.array([n - 1], np.int64)  # one row: the head is unused
                main, past = self._run(feeds, past, where, main="hidden_norm")  # [1, n, H]
                total += main[0].sum(axis=0, dtype=np.float64)
            else:
                main, past = self._run(feeds, past, where)  # [1, n, H]
                outs.append(main[0])
        if self._last:
            return (total / item.length).astype(np.float32)[None]  # [1, H]
        return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)  # [S, H]

    # -- decode rows: one padded batch ------------------------------------------

    def _decode(self, items: list[SeqInput]) -> list[np.ndarray]:
        ids = [item.seq_id for item in items]
        group = self._seqs[ids[0]].group
        if group is None or sorted(group.ids) != sorted(ids):
            group = self._form(ids)
        order = {sid: r for r, sid in enumerate(group.ids)}
        by_row = sorted(items, key=lambda it: order[it.seq_id])
        b = len(group.ids)
        lengths = np.array([self._seqs[sid].length for sid in group.ids], np.int64)
        feeds = self._data(by_row, b)
        feeds["position_ids"] = lengths[:, None]  # [B, 1]
        key_pos = np.concatenate([group.key_pos, lengths[:, None]], axis=1)  # [B, T+1]
        feeds["key_position"] = key_pos
        if self._last:
            feeds["logit_index"] = np.zeros(1, np.int64)
        main, group.kv = self._run(feeds, group.kv, f"decoding {b} sequences")
        group.key_pos = key_pos
        for sid in group.ids:
            self._seqs[sid].length += 1
        return [np.ascontiguousarray(main[order[sid]], dtype=np.float32) for sid in ids]

    def _rows(self, sid: int, hosts: dict[int, list[np.ndarray]]) -> list[np.ndarray]:
        """One sequence's cache on the host, ``[KV, L, D]`` per (layer, key|value);
        a group's tensors are copied to the host once per ``hosts`` dict."""
        seq = self._seqs[sid]
        if seq.group is None:
            if not seq.kv or seq.length == 0:
                shape = (self._kv_heads, 0, self._head_dim)
                return [np.zeros(shape, np.float32) for _ in range(2 * len(self._layers))]
            return [self._kv_host(t)[0] for t in seq.kv]
        group = seq.group
        key = id(group)
        if key not in hosts:
            hosts[key] = [self._kv_host(t) for t in group.kv]
        r = group.ids.index(sid)
        filled = group.key_pos[r] >= 0
        return [h[r][:, filled] for h in hosts[key]]

    def _layout(self, ids: list[int], caches: list[list[np.ndarray]]) -> _Group:
        """A group of ``ids`` from their host caches, left-padded to the longest."""
        lengths = [c[0].shape[1] for c in caches]
        t = max(lengths)
        b, kvh, d = len(ids), self._kv_heads, self._head_dim
        key_pos = np.full((b, t), -1, np.int64)
        tensors = []
        for j in range(2 * len(self._layers)):
            if not t:
                tensors.append(self._kv_empty(b))
                continue
            full = np.zeros((b, kvh, t, d), np.float32)
            for r, cache in enumerate(caches):
                if lengths[r]:
                    full[r, :, t - lengths[r] :] = cache[j]
            tensors.append(self._kv_device(full))
        for r, n in enumerate(lengths):
            key_pos[r, t - n :] = np.arange(n)
        group = _Group(list(ids), tensors, key_pos)
        for sid in ids:
            self._seqs[sid].group, self._seqs[sid].kv = group, None
        return group

    def _form(self, ids: list[int]) -> _Group:
        """Re-lay: the decode rows of this call become one group; the groups they
        came from keep (compacted) whatever members stay behind."""
        hosts: dict[int, list[np.ndarray]] = {}
        caches = [self._rows(sid, hosts) for sid in ids]
        left = {id(g): g for sid in ids if (g := self._seqs[sid].group) is not None}
        for sid in ids:
            self._seqs[sid].group = None
        for g in left.values():
            self._regroup(g, keep=[i for i in g.ids if i not in set(ids)], hosts=hosts)
        group = self._layout(ids, caches)
        self._groups.append(group)
        return group

    def _regroup(
        self, group: _Group, keep: list[int], hosts: dict[int, list[np.ndarray]] | None = None
    ) -> None:
        """Replace ``group`` by one of only ``keep`` (released or departed rows dropped)."""
        hosts = {} if hosts is None else hosts
        if id(group) not in hosts:
            hosts[id(group)] = [self._kv_host(t) for t in group.kv]
        if group in self._groups:
            self._groups.remove(group)
        if not keep:
            return
        caches = []
        for sid in keep:
            r = group.ids.index(sid)
            filled = group.key_pos[r] >= 0
            caches.append([h[r][:, filled] for h in hosts[id(group)]])
        self._groups.append(self._layout(keep, caches))

    def _own(self, sid: int) -> _Seq:
        """The sequence with its cache as its own tensors (taken out of a group)."""
        seq = self._seqs[sid]
        if seq.group is not None:
            group = seq.group
            cache = self._rows(sid, {})
            seq.group = None
            self._regroup(group, keep=[i for i in group.ids if i != sid])
            seq.kv = (
                [self._kv_device(np.ascontiguousarray(c[None])) for c in cache]
                if seq.length
                else None
            )
        if seq.kv is None:
            seq.kv = [self._kv_empty(1) for _ in range(2 * len(self._layers))]
        return seq

    def _truncate(self, sid: int, keep: int) -> None:
        seq = self._own(sid)
        assert seq.kv is not None
        if keep == 0:
            seq.kv = [self._kv_empty(1) for _ in seq.kv]
        else:
            seq.kv = [
                self._kv_device(np.ascontiguousarray(self._kv_host(t)[:, :, :keep])) for t in seq.kv
            ]
        seq.length = keep
