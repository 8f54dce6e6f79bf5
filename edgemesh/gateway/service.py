"""A model the gateway serves: its engine, tokenizer and description.

``serve_pipeline`` is the one way a served model is put together, on one box
(``edgemesh.local``) and in the mesh (``edgemesh.router.service``): an
``Engine`` over the pipeline under the model's ``ServingLimits``, wrapped in
a ``ModelService``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgemesh import heap
from edgemesh.engine import Engine
from edgemesh.errors import RequestError
from edgemesh.limits import ServingLimits
from edgemesh.pipeline import Pipeline
from edgemesh.tokenizer import Tokenizer


@dataclass
class ModelService:
    name: str
    engine: Engine
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))
    info: dict[str, Any] = field(default_factory=dict)
    """Shown by /v1/models and the dashboard: backend, precision, stages."""
    embedder_factory: Callable[[], Any] | None = None
    """Opens what serves /v1/embeddings (``embed(ids_list)``, ``dimensions``,
    ``context_length``); None: this model serves no embeddings."""
    _embedder: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int:
        return self.engine.config.context_length

    @property
    def default_max_tokens(self) -> int:
        """Used by chat requests that give no max_tokens (the serving limits')."""
        return self.engine.config.default_max_tokens

    def embedder(self) -> Any:
        """The embedder, opened on first use; a 400 where the model has none."""
        if self.embedder_factory is None:
            raise RequestError(
                f"'{self.name}' serves no embeddings here (they need a GGUF model on "
                "llama.cpp, or a converted package on onnxruntime or OpenVINO)",
                param="model",
                code="embeddings_unsupported",
            )
        with self._lock:
            if self._embedder is None:
                self._embedder = self.embedder_factory()
            return self._embedder

    def close(self) -> None:
        self.engine.close()
        if self._embedder is not None:
            self._embedder.close()
        closer = getattr(self.tokenizer, "close", None)
        if closer is not None:
            closer()


def serve_pipeline(
    name: str,
    pipeline: Pipeline,
    tokenizer: Tokenizer,
    limits: ServingLimits,
    *,
    info: dict[str, Any],
    embedder_factory: Callable[[], Any] | None = None,
) -> ModelService:
    """``pipeline`` served as model ``name``: the engine admits, queues and
    prefills under ``limits`` (whose context and sequence slots the backends
    were opened with). The service owns the pipeline from here (``close``).
    ``info`` gains ``limits`` (shown on /v1/models and the dashboard); it is
    kept, not copied, so a caller may go on updating it."""
    info["limits"] = limits.to_dict()
    engine = Engine(pipeline, tokenizer, limits)
    heap.trim()  # what loading the tokenizer and the sessions freed
    return ModelService(
        name=name, engine=engine, tokenizer=tokenizer, info=info, embedder_factory=embedder_factory
    )
