"""A graph model the gateway serves over /v2: package + engine + dynamic batcher.

``load_graph_service(path, ...)`` opens a graph package, picks this box's
backend and precision (``select.choose``), verifies that precision's files
against ``graph.json``, compiles (or reads the cached compile of) the
engine under ``engines/<box-key>/`` and wraps it in a ``DynamicBatcher``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import TensorError
from edgemesh.graph import engine_accuracy
from edgemesh.graph.batcher import BatchingOptions, DynamicBatcher
from edgemesh.graph.manifest import GraphManifest
from edgemesh.graph.select import DEFAULT_MAX_ACCURACY_LOSS, Choice, box_key, choose

log = logging.getLogger(__name__)

PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino",
    "tensorrt": "tensorrt_plan",
    "rknn": "rknn",
}


@dataclass(frozen=True)
class GraphServeOptions:
    name: str | None = None
    backend: str | None = None
    precision: str | None = None
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS
    threads: int | None = None
    batching: BatchingOptions = field(default_factory=BatchingOptions)


class GraphService:
    """One served graph. ``infer`` validates, batches and runs; safe to call
    from many requests at once on one event loop."""

    def __init__(
        self,
        name: str,
        root: Path,
        manifest: GraphManifest,
        backend: Any,
        choice: Choice,
        batching: BatchingOptions,
    ) -> None:
        self.name = name
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.choice = choice
        self.created = int(time.time())
        self.engine_accuracy: Any = None
        self.measured_p50_ms: float | None = None
        """This box's engine measured on the eval samples (None: onnxruntime, whose
        figures are the manifest's)."""
        batchable = all(s.batched for s in manifest.inputs)
        self.batcher = DynamicBatcher(backend.run, batching, batchable=batchable)
        self._inputs = {s.name: s for s in manifest.inputs}

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    @property
    def info(self) -> dict[str, Any]:
        entry = self.manifest.precisions[self.choice.precision]
        return {
            "backend": self.choice.backend,
            "precision": self.choice.precision,
            "device": self.choice.device,
            "chosen_by": self.choice.reason,
            "path": str(self.root),
            "source": self.manifest.source.framework,
            "accuracy": None if entry.accuracy is None else entry.accuracy.__dict__,
            "accuracy_on_engine": None
            if self.engine_accuracy is None
            else self.engine_accuracy.__dict__,
            "compiled_from": getattr(self.backend, "compiled_from", "onnx"),
            "measured_p50_ms": self.measured_p50_ms,
        }

    def validate(self, feeds: dict[str, np.ndarray]) -> None:
        missing = [n for n in self._inputs if n not in feeds]
        extra = [n for n in feeds if n not in self._inputs]
        if missing or extra:
            raise TensorError(
                f"model '{self.name}' takes inputs {list(self._inputs)}; missing {missing}, "
                f"unknown {extra}",
                param=(missing or extra)[0],
            )
        rows = set()
        for name, array in feeds.items():
            spec = self._inputs[name]
            spec.check(array)
            if spec.batched:
                rows.add(array.shape[0])
        if len(rows) > 1:
            raise TensorError(f"inputs disagree on the batch size: {sorted(rows)}")
        if rows:
            n = rows.pop()
            if n == 0:
                raise TensorError("the inputs have an empty batch axis (0 rows)")
            if n > self.backend.capabilities.max_batch:
                raise TensorError(
                    f"batch of {n} exceeds this engine's max batch "
                    f"{self.backend.capabilities.max_batch}; split the request"
                )

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Input name -> array in; output name -> array out (graph order)."""
        self.validate(feeds)
        outputs = await self.batcher.submit(feeds)
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs, strict=True)}

    def metadata(self) -> dict[str, Any]:
        """OIP model metadata."""
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": PLATFORMS.get(self.choice.backend, self.choice.backend),
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in self.manifest.inputs
            ],
            "outputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in self.manifest.outputs
            ],
        }

    def config(self) -> dict[str, Any]:
        """Triton-style model configuration (``GET /v2/models/{m}/config``)."""
        b = self.batcher.options
        meta = self.metadata()
        return {
            "name": self.name,
            "platform": meta["platform"],
            "max_batch_size": b.max_batch if self.batcher.batchable else 0,
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(b.max_queue_delay_ms * 1000),
                "max_queue_size": b.max_queue,
            },
            "input": meta["inputs"],
            "output": meta["outputs"],
            "parameters": {"edgemesh": self.info},
        }

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats.to_dict()

    def close(self) -> None:
        self.batcher.close()
        self.backend.close()


def load_graph_service(path: Path | str, options: GraphServeOptions | None = None) -> GraphService:
    """Open the graph package at ``path`` for serving on this box (blocks: compiles)."""
    options = options or GraphServeOptions()
    root = Path(path).expanduser().resolve()
    manifest = GraphManifest.load(root)
    fingerprint = None
    if options.backend is None or options.precision is None:
        from edgemesh.fingerprint import collect

        fingerprint = collect().to_dict()
    # The import measured each precision on onnxruntime; another engine is
    # measured here on the package's eval samples, and a precision it runs
    # outside the budget is refused like one the import measured too lossy.
    measured = manifest
    while True:
        choice = choose(
            measured,
            backend=options.backend,
            precision=options.precision,
            max_accuracy_loss=options.max_accuracy_loss,
            fingerprint=fingerprint,
        )
        backend, engine_dir = _open_backend(root, manifest, choice, options, fingerprint)
        acc = None
        if choice.backend != "onnxruntime":
            acc = engine_accuracy.measure(backend, manifest, root, engine_dir)
        if acc is None or options.precision is not None or acc.loss <= options.max_accuracy_loss:
            break
        backend.close()
        measured = copy.deepcopy(measured)
        entry = measured.precisions[choice.precision]
        measured.precisions[choice.precision] = dataclasses.replace(entry, accuracy=acc)
        log.info(
            "%s: %s at %s measured loss %.4f on this box; trying the next precision",
            manifest.name,
            choice.backend,
            choice.precision,
            acc.loss,
        )
    log.info("%s: %s/%s (%s)", manifest.name, choice.backend, choice.precision, choice.reason)
    service = GraphService(
        options.name or manifest.name, root, manifest, backend, choice, options.batching
    )
    service.engine_accuracy = acc
    service.measured_p50_ms = _time_one(backend, manifest)
    return service


def _time_one(backend: Any, manifest: GraphManifest, runs: int = 5) -> float | None:
    """p50 of ``runs`` batch-1 calls after one warm-up: what placement compares."""
    if any(-1 in s.concrete(1, fill=-1) for s in manifest.inputs):
        return None  # a dynamic non-batch axis: no one size to time at
    feeds = {s.name: np.zeros(s.concrete(1), s.dtype) for s in manifest.inputs}
    backend.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return round(float(np.median(times)), 3)


def _open_backend(
    root: Path,
    manifest: GraphManifest,
    choice: Choice,
    options: GraphServeOptions,
    fingerprint: dict[str, Any] | None,
) -> tuple[Any, Path | None]:
    from edgemesh.backends import registry
    from edgemesh.backends.graph_base import GraphOptions

    graph = manifest.verify(root, choice.precision)
    cls = registry.get_graph(choice.backend)
    engine_dir = None
    if cls.capabilities.compiled_format is not None:
        engine_dir = root / "engines" / box_key(cls, choice.device, fingerprint)
    backend = cls(
        graph,
        manifest.inputs,
        choice.precision,
        GraphOptions(
            threads=options.threads,
            device=choice.device,
            engine_dir=engine_dir,
            max_batch=options.batching.max_batch,
        ),
    )
    return backend, engine_dir
