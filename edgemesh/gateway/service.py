"""A model the gateway serves: its engine, tokenizer and description."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edgemesh.engine import Engine
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

    @property
    def context_length(self) -> int:
        return self.engine.config.context_length

    def close(self) -> None:
        self.engine.close()
        closer = getattr(self.tokenizer, "close", None)
        if closer is not None:
            closer()
