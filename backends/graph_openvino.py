"""OpenVINO graph backend (Intel CPU, iGPU, NPU).

The package's ONNX graph is converted once per box into OpenVINO IR
(``engine_dir/model.<precision>.xml`` + ``.bin``); later starts read the IR
instead of the ONNX (no conversion). fp16 packages keep fp32 I/O; the CPU
plugin runs them at its own inference precision. int8 QDQ graphs become
FakeQuantize nodes that the CPU plugin runs as int8 kernels.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from edgemesh.backends.graph_base import GraphBackend, GraphCapabilities, GraphOptions
from edgemesh.errors import InferenceError, ShardLoadError, require
from edgemesh.graph.tensors import TensorSpec

log = logging.getLogger(__name__)
_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}


class OpenVinoGraph(GraphBackend):
    name = "openvino"
    capabilities = GraphCapabilities(
        precisions=("fp32", "fp16", "int8"),
        fast_fp16_devices=("gpu", "npu"),
        devices=("cpu", "gpu", "npu"),
        compiled_format="openvino-ir",
    )
    extra = "openvino"
    module = "openvino"

    def __init__(
        self,
        graph: Path,
        inputs: list[TensorSpec],
        precision: str,
        options: GraphOptions | None = None,
    ) -> None:
        super().__init__(graph, inputs, precision, options)
        ov = require("openvino", self.extra)
        from edgemesh.graph.graph_check import translate_runtime_error

        core = ov.Core()
        kind, _, index = self.options.device.partition(":")
        device = _DEVICES.get(kind, kind.upper()) + (f".{index}" if index else "")
        self.compiled_from: str = "onnx"
        try:
            model = self._read(ov, core)
            config: dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
            if self.options.threads and device.startswith("CPU"):
                config["INFERENCE_NUM_THREADS"] = str(self.options.threads)
            self._compiled = core.compile_model(model, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError for every failure
            typed = translate_runtime_error(exc, f"OpenVINO {ov.__version__}", None)
            if typed is not None:
                raise typed from exc
            raise ShardLoadError(f"OpenVINO could not load '{self.graph}': {exc}") from exc
        self._request = self._compiled.create_infer_request()
        self._names = [i.name for i in inputs]
        self._lock = threading.Lock()

    def _read(self, ov, core):
        """The IR cached for this box, or the ONNX converted and saved as IR."""
        folder = self.options.engine_dir
        if folder is None:
            return core.read_model(str(self.graph))
        xml = Path(folder) / f"model.{self.precision}.xml"
        stamp = xml.with_suffix(".source")
        source_id = f"{self.graph.name} {self.graph.stat().st_size} {self.graph.stat().st_mtime_ns}"
        if xml.is_file() and stamp.is_file() and stamp.read_text() == source_id:
            self.compiled_from = "cache"
            return core.read_model(str(xml))
        model = core.read_model(str(self.graph))
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(xml), compress_to_fp16=self.precision == "fp16")
        stamp.write_text(source_id)
        log.info("OpenVINO IR cached at %s", xml)
        return model

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._request is None:
                raise InferenceError("the OpenVINO graph backend is closed")
            try:
                result = self._request.infer([feeds[n] for n in self._names])
            except Exception as exc:
                raise InferenceError(f"OpenVINO failed: {exc}") from exc
            return [np.array(result[out]) for out in self._compiled.outputs]

    def close(self) -> None:
        with self._lock:
            self._request = None
            self._compiled = None


GRAPH_BACKEND = OpenVinoGraph
