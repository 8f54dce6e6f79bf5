"""The graph-backend contract: run a whole fixed graph (vision and other
non-LLM models) on one engine. It sits beside the LLM range contract
(``base.Backend``) in the same registry (``registry.graph_backends()``).

A graph backend is built from one precision's ONNX graph of an imported
graph package (``edgemesh.graph``), compiles whatever its engine needs
(OpenVINO IR, TensorRT plan, RKNN model) into ``GraphOptions.engine_dir``
(one folder per box fingerprint, so a second start loads the compiled
artifact), and runs ``run(feeds)``: input name -> array (batch on axis 0)
in, outputs in the graph's order out. No KV state, no sequences.

``run`` blocks and is serialized by the caller (the service's batcher runs
one batch at a time); callers keep it off the event loop.

A module defines ``GRAPH_BACKEND`` (not ``BACKEND``), so the LLM path and
its conformance suite never see graph backends.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edgemesh.graph.tensors import TensorSpec


@dataclass(frozen=True)
class GraphCapabilities:
    precisions: tuple[str, ...]
    """Precisions of the package it can run."""
    fast_fp16_devices: tuple[str, ...] = ()
    """Devices with native fp16 kernels; elsewhere fp16 is emulated (slower than
    fp32), so the precision choice skips it there."""
    devices: tuple[str, ...] = ("cpu",)
    compiled_format: str | None = None
    """What it compiles from the ONNX graph and caches per box (None: runs ONNX as is)."""
    max_batch: int = 64


@dataclass(frozen=True)
class GraphOptions:
    threads: int | None = None
    device: str = "cpu"
    engine_dir: Path | None = None
    """This box's compiled-artifact folder inside the package (``engines/<key>``)."""
    max_batch: int = 8
    """Largest batch the service will send (engines with static profiles build for it)."""


class GraphBackend(ABC):
    """Construction loads (and compiles, or reads the cached compile of) the
    graph and raises ``BackendUnavailableError``, ``ShardLoadError`` or
    ``UnsupportedOpError``; ``run`` raises ``InferenceError``."""

    name: ClassVar[str]
    capabilities: ClassVar[GraphCapabilities]
    extra: ClassVar[str]
    module: ClassVar[str]

    def __init__(
        self,
        graph: Path,
        inputs: list[TensorSpec],
        precision: str,
        options: GraphOptions | None = None,
    ) -> None:
        self.graph = Path(graph)
        self.inputs = inputs
        self.precision = precision
        self.options = options or GraphOptions()

    @classmethod
    def available(cls) -> str | None:
        """None when usable here, else why not. Cheap: imports nothing."""
        if importlib.util.find_spec(cls.module) is None:
            return f"'{cls.module}' is not installed (pip install 'edgemesh[{cls.extra}]')"
        return None

    @classmethod
    def runtime_version(cls) -> str:
        """The engine's version, part of the compiled-artifact cache key."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(cls.module)
        except PackageNotFoundError:
            return "unknown"

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch: ``feeds`` holds every input ``[N, ...]``; returns the
        graph's outputs in order, each ``[N, ...]``."""

    @abstractmethod
    def close(self) -> None:
        """Free the engine. Idempotent."""

    def __enter__(self) -> GraphBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
