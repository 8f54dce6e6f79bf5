"""onnxruntime graph backend: the portable engine for graph packages.

CPU execution provider everywhere; the CUDA (and TensorRT) execution
providers when this onnxruntime build has them and the device is ``cuda``.
Runs the package's ONNX as is (no compiled artifact). int8 packages are
QDQ graphs, which onnxruntime fuses into QLinear* int8 kernels at load.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgemesh.backends.graph_base import GraphBackend, GraphCapabilities, GraphOptions
from edgemesh.errors import InferenceError, ShardLoadError, require
from edgemesh.graph.tensors import TensorSpec


class OnnxRuntimeGraph(GraphBackend):
    name = "onnxruntime"
    capabilities = GraphCapabilities(
        precisions=("fp32", "fp16", "int8"), fast_fp16_devices=("cuda",), devices=("cpu", "cuda")
    )
    extra = "onnx"
    module = "onnxruntime"

    def __init__(
        self,
        graph: Path,
        inputs: list[TensorSpec],
        precision: str,
        options: GraphOptions | None = None,
    ) -> None:
        super().__init__(graph, inputs, precision, options)
        ort = require("onnxruntime", self.extra)
        from edgemesh.graph.graph_check import translate_runtime_error

        so = ort.SessionOptions()
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.options.device.startswith("cuda"):
            have = ort.get_available_providers()
            providers = [
                p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have
            ] + providers
        try:
            self._session = ort.InferenceSession(str(self.graph), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            typed = translate_runtime_error(exc, f"onnxruntime {ort.__version__}", None)
            if typed is not None:
                raise typed from exc
            raise ShardLoadError(f"onnxruntime could not load '{self.graph}': {exc}") from exc
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, inputs: list[TensorSpec], threads: int | None = None):
        """A session on any ONNX file (the importer's measurements)."""
        return cls(path, inputs, "fp32", GraphOptions(threads=threads))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._session is None:
                raise InferenceError("the onnxruntime graph backend is closed")
            try:
                return list(self._session.run(self._outputs, feeds))
            except Exception as exc:
                raise InferenceError(f"onnxruntime failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._session = None


GRAPH_BACKEND = OnnxRuntimeGraph
