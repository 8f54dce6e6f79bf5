"""Embeddings of a GGUF model: the last hidden layer, mean-pooled, L2-normalised.

A second llama.cpp context on the same file with ``embeddings`` on and mean
pooling (llama.cpp's ``LLAMA_POOLING_TYPE_MEAN``), so embedding requests
never share KV slots or batches with generation. It is opened on the first
request (the weights are mapped again: ~0.3 GB for the default model) and
runs one input at a time under a lock, off the event loop.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import InferenceError, ShardLoadError

_POOLING_MEAN = 1


class GgufEmbedder:
    """``embed(ids_list) -> [ [H] float32 ]`` for one GGUF model. Blocking."""

    def __init__(
        self, path: Path, *, threads: int | None = None, context_length: int = 2048
    ) -> None:
        from edgemesh.backends.llamacpp import _load_model, check_gguf

        self._llama, self._model = _load_model(check_gguf(path), vocab_only=False)
        llama = self._llama
        trained = llama.llama_model_n_ctx_train(self._model)
        self.context_length = min(context_length, trained)
        self.dimensions = int(llama.llama_model_n_embd(self._model))
        params = llama.llama_context_default_params()
        params.n_ctx = self.context_length
        params.n_batch = self.context_length
        params.n_ubatch = self.context_length  # mean pooling needs the whole input in one ubatch
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = _POOLING_MEAN
        if threads:
            params.n_threads = threads
            params.n_threads_batch = threads
        if hasattr(params, "no_perf"):
            params.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ShardLoadError(f"llama.cpp could not open an embedding context for '{path}'")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(self.context_length, 0, 1)
        self._lock = threading.Lock()
        self._closed = False

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise InferenceError("the embedding context is closed")
            return [self._one(ids) for ids in inputs]

    def _one(self, ids: list[int]) -> np.ndarray:
        llama, b = self._llama, self._batch
        llama.llama_memory_clear(self._memory, True)
        for k, tok in enumerate(ids):
            b.token[k] = tok
            b.pos[k] = k
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = 0
            b.logits[k] = True
        b.n_tokens = len(ids)
        rc = llama.llama_decode(self._ctx, b)
        if rc != 0:
            raise InferenceError(f"llama_decode failed while embedding (code {rc})")
        ptr = llama.llama_get_embeddings_seq(self._ctx, 0)
        if not ptr:
            raise InferenceError("llama.cpp returned no pooled embedding")
        vec = np.ctypeslib.as_array(ptr, shape=(self.dimensions,)).astype(np.float32)  # [H]
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            llama: Any = self._llama
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            llama.llama_model_free(self._model)
