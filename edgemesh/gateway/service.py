"""A model the gateway serves: its engine, tokenizer and description."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgemesh.engine import Engine
from edgemesh.errors import RequestError
from edgemesh.tokenizer import Tokenizer


@dataclass
class ModelService:
    name: str
    engine: Engine
    tokenizer: Tokenizer
    default_max_tokens: int = 256
    """Used by chat requests that give no max_tokens (a base model may never stop)."""
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

    def embedder(self) -> Any:
        """The embedder, opened on first use; a 400 where the model has none."""
        if self.embedder_factory is None:
            raise RequestError(
                f"'{self.name}' serves no embeddings here (they need a GGUF model on llama.cpp)",
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
