"""Embeddings: the last hidden layer (after the final norm), mean-pooled over
the input's tokens, L2-normalised; the same on both model kinds.

* A GGUF model (``GgufEmbedder``): a second llama.cpp context on the same
  file with ``embeddings`` on and mean pooling (llama.cpp's
  ``LLAMA_POOLING_TYPE_MEAN`` over its ``result_norm``), so embedding
  requests never share KV slots or batches with generation. It is opened on
  the first request (the weights are mapped again: ~0.3 GB for the default
  model) and runs one input at a time under a lock, off the event loop.
* A converted package (``PipelineEmbedder``): a *pooled pass*
  (``SeqInput.logits == "pooled"``) through the serving pipeline itself, on
  one box or through the mesh's stages: each range runs the input from an
  empty past and keeps no cache (no KV slot is taken), and the last range
  returns the mean of its graph's ``hidden_norm`` rows. No second copy of
  the weights; a pass waits its turn between the engine's steps.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.base import SeqInput
from edgemesh.errors import InferenceError, RequestError, ShardLoadError

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
        return normalised(vec)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            llama: Any = self._llama
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            llama.llama_model_free(self._model)


def normalised(vec: np.ndarray) -> np.ndarray:
    """``vec / |vec|`` (a zero vector stays zero)."""
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


class PipelineEmbedder:
    """``embed(ids_list) -> [ [H] float32 ]`` through a package's pipeline. Blocking.

    ``run`` takes one micro-batch of ``SeqInput`` and returns the last stage's
    outputs, one array per input (``LocalPipeline.forward``, or
    ``RayPipeline.pooled`` through the mesh). One input per call, so a long
    list never holds the pipeline for long; sequence ids are negative, so they
    never meet the engine's (which count up from 1)."""

    def __init__(
        self,
        run: Callable[[Sequence[SeqInput]], list[np.ndarray]],
        *,
        dimensions: int,
        context_length: int,
    ) -> None:
        self._run = run
        self.dimensions = dimensions
        self.context_length = context_length
        self._ids = itertools.count(-1, -1)
        self._lock = threading.Lock()

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        out = []
        for ids in inputs:
            with self._lock:
                seq_id = next(self._ids)
            tokens = np.asarray(ids, np.int64)  # [S]
            (pooled,) = self._run([SeqInput(seq_id, 0, tokens=tokens, logits="pooled")])
            vec = np.asarray(pooled, np.float32).reshape(-1)  # [H]
            if vec.shape[0] != self.dimensions:
                raise InferenceError(
                    f"the pooled pass returned {vec.shape[0]} values, not {self.dimensions}"
                )
            out.append(normalised(vec))
        return out

    def close(self) -> None:
        """Nothing of its own to free: the pipeline belongs to the engine."""


def pooled_embedder(
    run: Callable[[Sequence[SeqInput]], list[np.ndarray]],
    dimensions: int,
    context_length: int,
    can_pool: bool | None = None,
) -> PipelineEmbedder:
    """A ``PipelineEmbedder``, or a 400 ``embeddings_unsupported`` where the last
    stage is known not to pool (``can_pool`` False: a runtime without pooled
    passes, or a package converted before its head exported ``hidden_norm``).
    None: not known here (a remote last stage refuses the pass itself)."""
    if can_pool is False:
        raise RequestError(
            "this model's last stage cannot return pooled hidden states, so it serves no "
            "embeddings: they need onnxruntime or OpenVINO and a package whose head exports "
            "hidden_norm (re-convert one made before that with `edgemesh convert`), or a "
            "GGUF model on llama.cpp",
            param="model",
            code="embeddings_unsupported",
        )
    return PipelineEmbedder(run, dimensions=dimensions, context_length=context_length)


def pipeline_embedder(pipe: Any, dimensions: int, context_length: int) -> PipelineEmbedder:
    """The embedder of a package's serving pipeline: through the mesh's stages
    (``RayPipeline.pooled``: the last stage pools, it holds the final norm) or
    in process (``LocalPipeline.forward``, whose last backend says whether it
    can pool)."""
    pooled = getattr(pipe, "pooled", None)
    if pooled is not None:
        return pooled_embedder(pooled, dimensions, context_length)
    last = pipe.backends[-1]
    return pooled_embedder(
        pipe.forward, dimensions, context_length, bool(getattr(last, "can_pool", False))
    )
