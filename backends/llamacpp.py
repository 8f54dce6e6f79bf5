"""llama.cpp backend: a whole GGUF model through llama-cpp-python's C API.

Uses the low-level bindings, not ``llama_cpp.Llama``, because the engine
needs what the high-level class hides: several sequences per context (one
KV stream each, freed with ``llama_memory_seq_rm``) decoded together in one
``llama_decode`` call, and raw logits for sampling outside the model.

This module is the only place edgemesh imports ``llama_cpp``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.admission import RangeInputs, admit
from edgemesh.backends.base import Backend, BoxFacts, Capabilities, SeqInput, ShardSpec
from edgemesh.errors import (
    ConfigError,
    CorruptArtifactError,
    InferenceError,
    ModelNotFoundError,
    ShardLoadError,
    require,
)
from edgemesh.limits import DEFAULT_LIMITS
from edgemesh.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_init_lock = threading.Lock()
_initialised = False
_log_callback: Any = None  # keeps the ctypes callback alive for the process


def _lib() -> Any:
    """Import llama_cpp once, route its logging into Python's logging."""
    global _initialised, _log_callback
    llama = require("llama_cpp", "llamacpp")
    with _init_lock:
        if not _initialised:
            llama.llama_backend_init()

            @llama.llama_log_callback
            def _forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
                if text:
                    log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

            _log_callback = _forward
            llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
            _initialised = True
    return llama


def check_gguf(path: Path) -> Path:
    """Fail early with a typed error on a missing or non-GGUF file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"model file '{path}' does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise CorruptArtifactError(str(path), f"not a GGUF file (starts with {magic!r})")
    return path


@functools.cache
def extra_buffers_safe() -> bool:
    """Whether llama.cpp's extra CPU buffer types (AMX, weight repacking) may be used.

    On CPUs with AMX, llama.cpp 0.3.x builds with -march=native compile its AMX
    kernels, which die with SIGILL on ``tilezero`` in worker threads (their tile
    configuration is not loaded there; see ggml-org/llama.cpp PR 26954). Until
    that lands, AMX boxes run without the extra buffer types.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_tile" not in line.split()
    except OSError:
        pass
    return True


def model_params(llama: Any) -> Any:
    """llama.cpp model parameters for a CPU load that is safe on this CPU."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = extra_buffers_safe()
    return params


def _load_model(path: Path, *, vocab_only: bool) -> tuple[Any, Any]:
    llama = _lib()
    params = model_params(llama)
    params.vocab_only = vocab_only
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise CorruptArtifactError(str(path), "llama.cpp could not load it (truncated or damaged?)")
    return llama, model


def gguf_layer_count(path: Path) -> int:
    """Transformer layers of a GGUF model (reads metadata only)."""
    llama, model = _load_model(check_gguf(path), vocab_only=True)
    try:
        return _meta_int(llama, model, "block_count")
    finally:
        llama.llama_model_free(model)


def _meta_str(llama: Any, model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def _meta_int(llama: Any, model: Any, suffix: str) -> int:
    arch = _meta_str(llama, model, "general.architecture") or "llama"
    value = _meta_str(llama, model, f"{arch}.{suffix}")
    if value is None:
        raise CorruptArtifactError("gguf", f"metadata '{arch}.{suffix}' is missing")
    return int(value)


class LlamaCppBackend(Backend):
    """Whole-model GGUF on llama.cpp's CPU path. Sequences map to KV streams."""

    name = "llamacpp"
    module = "llama_cpp"
    extra = "llamacpp"
    capabilities = Capabilities(
        partial_ranges=False,
        precisions=("fp32", "fp16", "int8", "int4"),
        artifact_format="gguf",
        max_batch=16,
        needs_compiled_artifact=False,
    )

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        # Its hand-written NEON kernels are the fastest CPU path on ARM.
        return 20 if box.arch.startswith(("aarch64", "arm")) else None

    def __init__(self, shard: ShardSpec, options: Any = None) -> None:
        super().__init__(shard, options)
        if not shard.is_whole:
            raise ConfigError(
                f"llama.cpp runs whole models only; got layers {shard.layers} of "
                f"{shard.num_layers}",
                hint="plan this box as a single stage or use the onnxruntime backend",
            )
        path = check_gguf(shard.model)
        self._llama, self._model = _load_model(path, vocab_only=False)
        llama = self._llama
        self._lock = threading.Lock()
        self._closed = False
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model))
        self.n_embd = llama.llama_model_n_embd(self._model)
        trained_ctx = llama.llama_model_n_ctx_train(self._model)
        self.context_length = min(
            self.options.context_length or DEFAULT_LIMITS.context_length, trained_ctx
        )
        self.max_sequences = max(1, self.options.max_sequences)
        # Whole model: token ids in; one KV stream (context_length cells) per sequence.
        self._accepts = RangeInputs(shard.layers, True, 0, self.context_length, self.max_sequences)
        self.n_batch = 512

        cparams = llama.llama_context_default_params()
        # One KV stream per sequence: each gets the full context length.
        cparams.n_seq_max = self.max_sequences
        cparams.n_ctx = self.context_length * self.max_sequences
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        threads = self.options.threads or 0
        if threads > 0:
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = False
        if hasattr(cparams, "no_perf"):
            cparams.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ShardLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens for '{path}'",
                hint="lower the context length or the number of sequences",
            )
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._slots: dict[int, int] = {}
        self._free = list(range(self.max_sequences))
        self.graph_runs = 0
        """``llama_decode`` calls so far: a call's sequences share one (up to n_batch tokens)."""

    # -- contract ---------------------------------------------------------

    def forward(self, batch: Sequence[SeqInput]) -> list[np.ndarray]:
        # tokens: [S] per sequence -> logits: [1, V] or [S, V]
        with self._lock:
            if self._closed:
                raise InferenceError("the llama.cpp backend is closed")
            admit(batch, self._accepts, self._cached, len(self._slots))
            plan = []  # (seq index, token, pos, slot, output row or -1)
            outs: list[np.ndarray] = []
            for i, item in enumerate(batch):
                assert item.tokens is not None  # admit() refused hidden states
                slot = self._slot(item.seq_id)
                # A replay (start_pos below what is cached) drops the tail first,
                # as the other backends do.
                if self._llama.llama_memory_seq_pos_max(self._memory, slot) >= item.start_pos:
                    self._llama.llama_memory_seq_rm(self._memory, slot, item.start_pos, -1)
                n = item.length
                every = item.logits == "all"
                outs.append(np.empty((n if every else 1, self.n_vocab), np.float32))
                for j, tok in enumerate(item.tokens.tolist()):
                    row = j if every else (0 if j == n - 1 else -1)
                    plan.append((i, int(tok), item.start_pos + j, slot, row))
            # Rows in ascending stream order: with one KV stream per sequence
            # llama.cpp only keeps sequences in one ubatch when their streams
            # ascend; any other order splits the step into a pass per sequence
            # (measured here: 8 decode rows 48 ms ascending, 180 ms descending).
            plan.sort(key=lambda row: (row[3], row[2]))
            for begin in range(0, len(plan), self.n_batch):
                self._decode(plan[begin : begin + self.n_batch], outs)
            return outs

    def fork(self, src_seq_id: int, dst_seq_id: int) -> bool:
        # A whole-stream copy: llama.cpp copies between KV streams only entire.
        with self._lock:
            src = self._slots.get(src_seq_id)
            if self._closed or src is None or dst_seq_id in self._slots or not self._free:
                return False
            dst = self._slot(dst_seq_id)
            self._llama.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
            return True

    def release(self, seq_id: int) -> None:
        with self._lock:
            slot = self._slots.pop(seq_id, None)
            if slot is None or self._closed:
                return
            self._llama.llama_memory_seq_rm(self._memory, slot, -1, -1)
            self._free.append(slot)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._llama.llama_batch_free(self._batch)
            self._llama.llama_free(self._ctx)
            self._llama.llama_model_free(self._model)

    # -- internals --------------------------------------------------------

    def _cached(self, seq_id: int) -> int | None:
        slot = self._slots.get(seq_id)
        if slot is None:
            return None
        return int(self._llama.llama_memory_seq_pos_max(self._memory, slot)) + 1  # -1: empty

    def _slot(self, seq_id: int) -> int:
        slot = self._slots.get(seq_id)
        if slot is None:
            if not self._free:
                raise InferenceError(
                    f"all {self.max_sequences} sequence slots are busy",
                    hint="release finished sequences or raise max_sequences",
                )
            # The lowest free stream: a gap between the streams of one step
            # splits it as well (8 rows over streams 0-3 and 12-15: 63 ms vs 48).
            slot = min(self._free)
            self._free.remove(slot)
            self._slots[seq_id] = slot
        return slot

    def _decode(self, chunk: list[tuple[int, int, int, int, int]], outs: list[np.ndarray]) -> None:
        b = self._batch
        wanted = 0
        for k, (_, tok, pos, slot, row) in enumerate(chunk):
            b.token[k] = tok
            b.pos[k] = pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = slot
            b.logits[k] = row >= 0
            wanted += row >= 0
        b.n_tokens = len(chunk)
        rc = self._llama.llama_decode(self._ctx, b)
        self.graph_runs += 1
        if rc != 0:
            reason = "no room left in the KV cache" if rc == 1 else f"error code {rc}"
            raise InferenceError(f"llama_decode failed: {reason}")
        if not wanted:
            return
        # The call's logits, [outputs, V] float32 in batch order, copied straight
        # into each sequence's rows before the next decode overwrites them.
        logits = np.ctypeslib.as_array(
            self._llama.llama_get_logits(self._ctx), shape=(wanted, self.n_vocab)
        )
        k = 0
        for seq_index, *_rest, row in chunk:
            if row >= 0:
                outs[seq_index][row] = logits[k]
                k += 1


class GgufTokenizer(Tokenizer):
    """The tokenizer stored in a GGUF file, through llama.cpp's vocabulary."""

    def __init__(self, path: Path) -> None:
        llama, model = _load_model(check_gguf(path), vocab_only=True)
        self._llama, self._model = llama, model
        self._vocab = llama.llama_model_get_vocab(model)
        vocab = self._vocab
        self._n_vocab = llama.llama_vocab_n_tokens(vocab)
        bos = llama.llama_vocab_bos(vocab)
        self.bos_id = bos if bos >= 0 else None
        self.add_bos = bool(llama.llama_vocab_get_add_bos(vocab))
        self.eos_ids = frozenset(
            t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(vocab, t)
        )
        self.architecture = _meta_str(llama, model, "general.architecture") or "llama"
        raw = llama.llama_model_chat_template(model, None)
        self.chat_template = raw.decode("utf-8") if raw else None
        self.bos_text = self._piece(bos, special=True).decode() if bos >= 0 else ""
        eos = llama.llama_vocab_eos(vocab)
        self.eos_text = self._piece(eos, special=True).decode() if eos >= 0 else ""
        self._cache: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        data = text.encode("utf-8")
        add = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (self._llama.llama_token * cap)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add, True)
        if n < 0:
            cap = -n
            buf = (self._llama.llama_token * cap)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add, True)
        return list(buf[:n])

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._piece(token_id, special=False)
            self._cache[token_id] = cached
        return cached

    def _piece(self, token_id: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._llama.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
        return buf.raw[:n]

    def close(self) -> None:
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None


BACKEND = LlamaCppBackend
