"""Load a model on this box alone: the single-box fallback path.

Everything runs in-process: the engine calls the backend directly, so no
request ever leaves the box. A GGUF file runs on llama.cpp; a converted
package runs its whole layer range on an ONNX backend (``load_package_service``)
chosen from this box's fingerprint unless the options name one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.backends.base import BackendOptions, LayerRange, ShardSpec
from edgemesh.chat_templates import fallback_for
from edgemesh.errors import ConfigError
from edgemesh.gateway.service import ModelService, serve_pipeline
from edgemesh.limits import DEFAULT_LIMITS, ServingLimits
from edgemesh.models import ModelSource
from edgemesh.pipeline import LocalPipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOptions:
    """How ``edgemesh serve`` opens a model on this box."""

    limits: ServingLimits = DEFAULT_LIMITS
    """Context, sequence slots, queue, prefill, threads: capped by the model's context."""
    backend: str | None = None
    precision: str | None = None
    chat_template: Path | None = None


def load_service(source: ModelSource, options: LocalOptions | None = None) -> ModelService:
    """Open ``source`` with the best local backend and wrap it in an engine."""
    options = options or LocalOptions()
    if source.kind == "package":
        return load_package_service(source, options)
    if options.precision not in (None, "int4"):
        raise ConfigError(
            f"a GGUF file runs at the bit width it was saved with; --precision "
            f"'{options.precision}' applies to converted packages only"
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
    backend = backend_cls(shard, BackendOptions.for_limits(options.limits))
    # the backend caps the context at what the model was trained for
    limits = options.limits.replace(
        context_length=getattr(backend, "context_length", options.limits.context_length)
    )
    context = limits.context_length
    info = {
        "backend": backend_cls.name,
        "path": str(source.path),
        "layers": layers,
        "stages": [{"box": "local", "layers": [0, layers], "backend": backend_cls.name}],
    }
    from edgemesh.gateway.embeddings import GgufEmbedder

    def embedder() -> GgufEmbedder:
        return GgufEmbedder(source.path, threads=limits.threads, context_length=context)

    return serve_pipeline(
        source.name,
        LocalPipeline([backend]),
        tokenizer,
        limits,
        info=info,
        embedder_factory=embedder,
    )


def load_package_service(source: ModelSource, options: LocalOptions) -> ModelService:
    """Serve a converted package on this box: one in-process stage over all layers.

    No mesh and no router: the package's layers run in this process."""
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    package = open_package(source.path)
    manifest = package.manifest
    backend, precision, why = choose_package_runtime(
        manifest, backend=options.backend, precision=options.precision
    )
    log.info("%s: %s/%s (%s)", manifest.name, backend, precision, why)
    limits = options.limits.capped(context_length=manifest.context_length)
    context = limits.context_length
    pipe = load_pipeline(
        package,  # already opened and verified: not opened again
        [],
        [precision],
        backend=backend,
        options=BackendOptions.for_limits(limits),
    )
    where = [
        {
            "box": "local",
            "layers": [0, package.num_layers],
            "backend": backend,
            "precision": precision,
            "in_process": True,
        }
    ]
    tokenizer = package.tokenizer()
    if options.chat_template is not None:
        tokenizer.chat_template = Path(options.chat_template).read_text()
    info = {
        "backend": backend,
        "precision": precision,
        "path": str(package.root),
        "layers": package.num_layers,
        "stages": where,
        "chosen_by": why,
    }
    from edgemesh.gateway.embeddings import pooled_embedder

    def embedder() -> Any:
        last = pipe.backends[-1]
        return pooled_embedder(
            pipe.forward, manifest.hidden_size, context, getattr(last, "can_pool", False)
        )

    return serve_pipeline(
        source.name, pipe, tokenizer, limits, info=info, embedder_factory=embedder
    )


# Most compressed first; a box's default precision may move right (towards
# fp32) when the package lacks it or its measured accuracy loss is too high.
_TOWARDS_ACCURATE = ("int4", "int8", "fp16", "fp32")


def choose_package_runtime(
    manifest: Any,
    *,
    backend: str | None = None,
    precision: str | None = None,
    max_accuracy_loss: float = 0.10,
) -> tuple[str, str, str]:
    """(backend, precision, reason) for running ``manifest`` whole on this box.

    Backend: ``backend`` if given, else the first backend this box's
    fingerprint calls for that is installed, usable here and runs ONNX
    packages. Precision: ``precision`` if given, else the fingerprint's
    default, moved towards fp32 until the package has it and its measured
    accuracy loss is within ``max_accuracy_loss`` (the planner's rule).
    Raises ``ConfigError``/``BackendUnavailableError`` naming what to change.
    """
    from edgemesh.backends import registry
    from edgemesh.sharding.planner.costs import precision_refusal

    why = []
    fp: dict[str, Any] | None = None
    if backend is None or precision is None:
        from edgemesh.fingerprint import collect

        fp = collect().to_dict()
    if backend is None:
        candidates = [*fp["installed"], "onnxruntime"]
        refused = []
        for name in dict.fromkeys(candidates):
            cls = registry.get(name)
            reason = cls.available()
            if cls.capabilities.artifact_format != "onnx":
                reason = f"runs {cls.capabilities.artifact_format} files, not packages"
            if reason is None:
                backend = name
                break
            refused.append(f"{name}: {reason}")
        if backend is None:
            raise ConfigError(
                "no installed backend can run a converted package here: " + "; ".join(refused),
                hint="pip install 'edgemesh[onnx]'",
            )
        why.append(f"backend from this box's fingerprint {fp['installed']}")
    else:
        fmt = registry.get(backend).capabilities.artifact_format
        if fmt != "onnx":
            raise ConfigError(
                f"backend '{backend}' runs {fmt} files, not converted packages",
                hint="choose onnxruntime or openvino, or serve a .gguf file",
            )
        registry.require_available(backend)
    caps = registry.get(backend).capabilities
    if precision is not None:
        refusal = precision_refusal(manifest, precision, float("inf"))
        if refusal or precision not in caps.precisions:
            raise ConfigError(
                f"cannot serve '{manifest.name}' at {precision}: "
                f"{refusal or f'{backend} does not run it'}",
                hint=f"the package has {', '.join(_package_precisions(manifest))}",
            )
        return backend, precision, "; ".join([*why, "precision from options"]) or "options"
    wanted = fp["precision"] if fp["precision"] in _TOWARDS_ACCURATE else "fp32"
    refusals = []
    for p in _TOWARDS_ACCURATE[_TOWARDS_ACCURATE.index(wanted) :]:
        refusal = precision_refusal(manifest, p, max_accuracy_loss)
        if refusal is None and p in caps.precisions:
            why.append(
                f"precision {p}"
                + (f" (fingerprint says {wanted}; {'; '.join(refusals)})" if refusals else "")
            )
            return backend, p, "; ".join(why)
        refusals.append(refusal or f"{p}: {backend} does not run it")
    raise ConfigError(
        f"no precision of '{manifest.name}' can be served: {'; '.join(refusals)}",
        hint="pass --precision, or re-convert the package with fp32 weights",
    )


def _package_precisions(manifest: Any) -> list[str]:
    return [p for p in _TOWARDS_ACCURATE if all(p in lc.weight_bytes for lc in manifest.layers)]
