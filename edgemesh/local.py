"""Load a model on this box alone: the single-box fallback path.

Everything runs in-process: the engine calls the backend directly, so no
request ever leaves the box.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec
from edgemesh.chat_templates import fallback_for
from edgemesh.engine import Engine, EngineConfig
from edgemesh.errors import ConfigError
from edgemesh.gateway.service import ModelService
from edgemesh.models import ModelSource
from edgemesh.pipeline import LocalPipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOptions:
    threads: int | None = None
    context_length: int = 4096
    max_sequences: int = 8
    max_queue: int = 32
    backend: str | None = None
    precision: str | None = None
    chat_template: Path | None = None


def load_service(source: ModelSource, options: LocalOptions | None = None) -> ModelService:
    """Open ``source`` with the best local backend and wrap it in an engine."""
    options = options or LocalOptions()
    if source.kind != "gguf":
        raise ConfigError(
            f"'{source.path}' is a converted package; serving packages needs the "
            "onnxruntime/openvino backends",
            hint="pass a .gguf file, or run `edgemesh generate` on the package",
        )
    if options.backend not in (None, "llamacpp"):
        raise ConfigError(f"a GGUF file runs on the llamacpp backend, not '{options.backend}'")
    from edgemesh.backends import registry

    backend_cls = registry.require_available("llamacpp")
    from edgemesh.backends.llamacpp import GgufTokenizer, gguf_layer_count

    tokenizer = GgufTokenizer(source.path)
    if options.chat_template is not None:
        tokenizer.chat_template = Path(options.chat_template).read_text()
    elif not tokenizer.chat_template:
        log.info(
            "%s has no chat template; using the %s family's turn format",
            source.name,
            tokenizer.architecture,
        )
        tokenizer.chat_template = fallback_for(tokenizer.architecture)
    layers = gguf_layer_count(source.path)
    shard = ShardSpec(source.path, LayerRange(0, layers), layers, precision="int4")
    backend = backend_cls(
        shard,
        BackendOptions(
            threads=options.threads,
            context_length=options.context_length,
            max_sequences=options.max_sequences,
        ),
    )
    context = getattr(backend, "context_length", options.context_length)
    engine = Engine(
        LocalPipeline([backend]),
        tokenizer,
        EngineConfig(
            context_length=context,
            max_sequences=options.max_sequences,
            max_queue=options.max_queue,
        ),
    )
    info = {
        "backend": backend_cls.name,
        "path": str(source.path),
        "layers": layers,
        "stages": [{"box": "local", "layers": [0, layers], "backend": backend_cls.name}],
    }
    return ModelService(name=source.name, engine=engine, tokenizer=tokenizer, info=info)
