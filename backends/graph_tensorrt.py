"""TensorRT graph backend (NVIDIA GPUs, Jetson), written against TensorRT 10's Python API.

* **Build.** ``Builder`` + ``OnnxParser`` on the package graph of the chosen
  precision; one optimisation profile per input covering batch
  ``1..max_batch`` (opt = max_batch) with the other axes as the graph fixes
  them. fp16: ``BuilderFlag.FP16``. int8: the package's QDQ graph
  (explicit quantization) with ``BuilderFlag.INT8`` (+ FP16 for layers
  left unquantized); TensorRT takes its scales from the Q/DQ nodes, no
  calibrator. A parser failure names the node and operator.
* **Cache.** The serialized plan goes to
  ``engine_dir/model.<precision>.b<max_batch>.plan``; ``engine_dir`` is
  per box fingerprint (GPU name and TensorRT version included, see
  ``edgemesh.graph.select.box_key``), so a plan is never loaded on another
  GPU or TensorRT release.
* **Buffers.** torch CUDA tensors, as the LLM TensorRT backend does;
  ``execute_async_v3`` on a private stream, outputs copied to the host.

Cannot run on this project's CI hosts (no NVIDIA GPU); its tests skip with
the reason. This module is the only graph-side place that imports ``tensorrt``.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.base import nvidia_gpu_present
from edgemesh.backends.graph_base import GraphBackend, GraphCapabilities, GraphOptions
from edgemesh.errors import (
    BackendUnavailableError,
    InferenceError,
    ShardLoadError,
    UnsupportedOpError,
    require,
)
from edgemesh.graph.tensors import TensorSpec

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 1 << 30


class TensorRtGraph(GraphBackend):
    name = "tensorrt"
    capabilities = GraphCapabilities(
        precisions=("fp32", "fp16", "int8"),
        fast_fp16_devices=("cuda",),
        devices=("cuda",),
        compiled_format="tensorrt-plan",
        max_batch=64,
    )
    extra = "tensorrt"
    module = "tensorrt"

    @classmethod
    def available(cls) -> str | None:
        reason = super().available()
        if reason is not None:
            return reason
        if not nvidia_gpu_present():
            return "no NVIDIA GPU (no /proc/driver/nvidia/gpus or /dev/nvidia0)"
        if importlib.util.find_spec("torch") is None:
            return "TensorRT buffers are torch CUDA tensors: pip install torch (a CUDA build)"
        return None

    def __init__(
        self,
        graph: Path,
        inputs: list[TensorSpec],
        precision: str,
        options: GraphOptions | None = None,
    ) -> None:
        super().__init__(graph, inputs, precision, options)
        trt = require("tensorrt", self.extra)
        self._torch = torch = require("torch", "import-torch")
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "torch has no CUDA here", hint="install a CUDA build of torch next to TensorRT"
            )
        _, _, index = self.options.device.partition(":")
        self._device = torch.device("cuda", int(index or 0))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._max_batch = max(1, self.options.max_batch)
        runtime = trt.Runtime(self._logger)
        plan = self._plan(trt)
        self._engine = runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ShardLoadError(f"TensorRT could not deserialize the plan built from {graph}")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [
            n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
        ]
        self._lock = threading.Lock()
        self.compiled_from = "cache" if self._cached else "onnx"

    def _plan(self, trt: Any) -> bytes:
        folder = self.options.engine_dir
        path = None
        self._cached = False
        if folder is not None:
            path = Path(folder) / f"model.{self.precision}.b{self._max_batch}.plan"
            if path.is_file():
                self._cached = True
                return path.read_bytes()
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(self.graph)):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            first = errors[0] if errors else None
            if first is not None and first.node_operator():
                raise UnsupportedOpError(
                    first.node_operator(), None, f"TensorRT {trt.__version__} ({first.desc()})"
                )
            raise ShardLoadError(
                f"TensorRT's ONNX parser refused {self.graph}: "
                + "; ".join(e.desc() for e in errors)
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit: scales from the Q/DQ nodes
        profile = builder.create_optimization_profile()
        for spec in self.inputs:
            lo = spec.concrete(1)
            hi = spec.concrete(self._max_batch)
            profile.set_shape(spec.name, lo, hi, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ShardLoadError(f"TensorRT failed to build an engine from {self.graph}")
        blob = bytes(plan)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            log.info("TensorRT plan cached at %s", path)
        return blob

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        with self._lock:
            if self._context is None:
                raise InferenceError("the TensorRT graph backend is closed")
            ctx = self._context
            keep = []
            with torch.cuda.stream(self._stream):
                for name, array in feeds.items():
                    t = torch.from_numpy(np.ascontiguousarray(array)).to(self._device)
                    keep.append(t)
                    ctx.set_input_shape(name, tuple(t.shape))
                    ctx.set_tensor_address(name, t.data_ptr())
                outs = {}
                for name in self._outputs:
                    shape = tuple(ctx.get_tensor_shape(name))
                    dtype = _TORCH_DTYPES[str(self._engine.get_tensor_dtype(name))]
                    dev = self._device
                    outs[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=dev)
                    ctx.set_tensor_address(name, outs[name].data_ptr())
                if not ctx.execute_async_v3(self._stream.cuda_stream):
                    raise InferenceError("TensorRT's execute_async_v3 returned false")
            self._stream.synchronize()
            return [outs[n].cpu().numpy() for n in self._outputs]

    def close(self) -> None:
        with self._lock:
            self._context = None
            self._engine = None


_TORCH_DTYPES = {
    "DataType.FLOAT": "float32",
    "DataType.HALF": "float16",
    "DataType.INT32": "int32",
    "DataType.INT64": "int64",
    "DataType.INT8": "int8",
    "DataType.UINT8": "uint8",
    "DataType.BOOL": "bool",
}

GRAPH_BACKEND = TensorRtGraph
