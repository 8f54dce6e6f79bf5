"""onnxruntime backend: any layer range of a converted package, any precision.

Loading verifies the range's artifacts by sha256, composes (or reuses) the
range graph from the package's per-layer pieces, and opens one
``InferenceSession``: the CPU execution provider with ``threads`` intra-op
threads, or CUDA / TensorRT when ``BackendOptions.device`` asks for them
and the installed onnxruntime has them.

KV cache: ``RangeGraphBackend`` (``backends/batching.py``) keeps the
caches and runs all decode rows of a call as one padded batch; here the
``present`` tensors stay ``OrtValue``s on the session's device and are
bound as the next call's ``past`` through I/O binding, so the cache never
crosses into numpy between steps (docs/SHARDS.md has the measurement
against plain ``session.run``).

This module is the only place edgemesh imports ``onnxruntime``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from edgemesh.backends.base import (
    PRECISIONS,
    BoxFacts,
    Capabilities,
    ShardSpec,
    nvidia_gpu_present,
)
from edgemesh.backends.batching import RangeGraphBackend
from edgemesh.errors import BackendUnavailableError, ConfigError, ShardLoadError, require

log = logging.getLogger(__name__)

_GPU_PROVIDERS = {
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}
# The CUDA provider runs fp32 MatMul/Gemm in TF32 (10-bit mantissa) unless told
# otherwise, which breaks an fp32 shard's 1e-5 agreement with the reference and
# with the same range on CPU. A package's precision names the weights; the
# arithmetic stays what the graph says.
_PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}
_ITEM_BYTES = {"tensor(float)": 4, "tensor(float16)": 2}


def select_providers(ort: Any, device: str) -> list[Any]:
    """Execution providers for ``device`` (``cpu``, ``cuda[:N]``, ``tensorrt``, ``auto``)."""
    available = set(ort.get_available_providers())
    kind, _, index = device.partition(":")
    if kind == "auto":
        kind = next((k for k in ("tensorrt", "cuda") if _GPU_PROVIDERS[k][0] in available), "cpu")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind not in _GPU_PROVIDERS:
        raise ConfigError(
            f"onnxruntime cannot run on device '{device}'", hint="use cpu, cuda or tensorrt"
        )
    wanted = _GPU_PROVIDERS[kind]
    if wanted[0] not in available:
        raise BackendUnavailableError(
            f"onnxruntime here has no {wanted[0]} (available: {', '.join(sorted(available))})",
            hint="install onnxruntime-gpu on a box with an NVIDIA GPU",
        )
    opts = {"device_id": int(index or 0)}
    chosen = [(p, opts | _PROVIDER_OPTIONS.get(p, {})) for p in wanted if p in available]
    return [*chosen, "CPUExecutionProvider"]


class OnnxRuntimeBackend(RangeGraphBackend):
    """A layer range of an edgemesh package on onnxruntime."""

    name = "onnxruntime"
    label = "onnxruntime"
    module = "onnxruntime"
    extra = "onnx"
    matmul_probe = "onnxruntime"
    capabilities = Capabilities(
        partial_ranges=True,
        precisions=PRECISIONS,
        artifact_format="onnx",
        max_batch=64,
        needs_compiled_artifact=False,
        devices=("cpu", "cuda"),
    )

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        return 10  # the portable fallback: every box

    @classmethod
    def device_unavailable(cls, device: str) -> str | None:
        kind = device.partition(":")[0]
        if kind not in _GPU_PROVIDERS:
            return super().device_unavailable(device)
        ort = require("onnxruntime", "onnx")
        provider = _GPU_PROVIDERS[kind][0]
        if provider not in ort.get_available_providers():
            return (
                f"onnxruntime {ort.__version__} here has no {provider} "
                "(install onnxruntime-gpu instead of onnxruntime)"
            )
        if not nvidia_gpu_present():
            return "no NVIDIA GPU here (no /proc/driver/nvidia/gpus, no /dev/nvidia0)"
        return None

    def __init__(self, shard: ShardSpec, options: Any = None, *, io_binding: bool = True) -> None:
        super().__init__(shard, options)
        ort = require("onnxruntime", "onnx")
        self._ort = ort
        self._io_binding = io_binding
        package = self._open_range()
        start, stop = shard.layers.start, shard.layers.stop
        # The last range also exposes hidden_norm (embeddings); fetched only when asked.
        extra = ("hidden_norm",) if self._last else ()
        path = package.range_graph(
            start, stop, shard.precision, self.options.cache_dir, outputs=extra
        )
        providers = select_providers(ort, self.options.device)
        so = ort.SessionOptions()
        if self.options.threads:
            so.intra_op_num_threads = int(self.options.threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # No CPU arena: its blocks grow with every new sequence length and are
        # never returned, so RSS drifted past the planner's KV budget (default
        # model, 16 sequences: 1232 MB with the arena, 1086 MB without, 2 % fewer tok/s).
        so.enable_cpu_mem_arena = False
        try:
            self._session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ShardLoadError(
                f"onnxruntime could not load layers {shard.layers} ({shard.precision}) of "
                f"'{package.manifest.name}': {exc}"
            ) from exc
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted not in self._session.get_providers():
            # onnxruntime drops a GPU provider whose CUDA/cuDNN libraries fail to
            # load with only a log line and runs on the CPU; the device-side KV
            # binding below would then fail on the first call, far from the cause.
            raise BackendUnavailableError(
                f"onnxruntime could not start {wanted} for device '{self.options.device}' "
                f"(the session got {', '.join(self._session.get_providers())})",
                hint="install the CUDA and cuDNN libraries onnxruntime-gpu was built for "
                "(pip install 'onnxruntime-gpu[cuda,cudnn]') or put their lib folders on "
                "LD_LIBRARY_PATH",
            )
        self._device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        self._device_id = (
            int(providers[0][1]["device_id"]) if isinstance(providers[0], tuple) else 0
        )
        names = [o.name for o in self._session.get_outputs()]
        self.can_pool = "hidden_norm" in names
        self._out_names = [n for n in names if n != "hidden_norm"]  # main, then presents
        log.info(
            "onnxruntime: layers %s at %s on %s (%s)",
            shard.layers,
            shard.precision,
            self._device,
            path.parent.name,
        )

    # -- contract ---------------------------------------------------------

    def _free(self) -> None:
        self._session = None

    def _kv_nbytes(self, kv: Any) -> int:
        return math.prod(kv.shape()) * _ITEM_BYTES[kv.data_type()]

    def _kv_host(self, kv: Any) -> np.ndarray:
        # numpy() of a CUDA OrtValue copies device to host in onnxruntime-gpu builds.
        return kv.numpy()

    def _kv_device(self, array: np.ndarray) -> Any:
        # On the CPU the OrtValue shares (and keeps alive) the array's memory.
        return self._ort.OrtValue.ortvalue_from_numpy(array, self._device, self._device_id)

    def _kv_empty(self, batch: int) -> Any:
        """A zero-length past, allocated on the device (nothing to copy)."""
        return self._ort.OrtValue.ortvalue_from_shape_and_type(
            (batch, self._kv_heads, 0, self._head_dim), np.float32, self._device, self._device_id
        )

    def _run_graph(
        self, feeds: dict[str, np.ndarray], past: list[Any], main: str | None = None
    ) -> tuple[np.ndarray, list[Any]]:
        if not self._io_binding:
            return self._run_plain(feeds, past, main)
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for j, layer in enumerate(self._layers):
            binding.bind_ortvalue_input(f"past_key.{layer}", past[2 * j])
            binding.bind_ortvalue_input(f"past_value.{layer}", past[2 * j + 1])
        # The main output comes back to the host; presents stay on the device
        # and become the next call's pasts.
        binding.bind_output(main or self._out_names[0], "cpu")
        for name in self._out_names[1:]:
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])  # [B, S|K, H|V]

    def _run_plain(
        self, feeds: dict[str, np.ndarray], past: list[Any], main: str | None = None
    ) -> tuple[np.ndarray, list[Any]]:
        """The unbound path (numpy in, numpy out), kept to measure the bound one against."""
        feeds = dict(feeds)
        for j, layer in enumerate(self._layers):
            feeds[f"past_key.{layer}"] = past[2 * j].numpy()
            feeds[f"past_value.{layer}"] = past[2 * j + 1].numpy()
        values = self._session.run([main or self._out_names[0], *self._out_names[1:]], feeds)
        return values[0], [self._kv_device(v) for v in values[1:]]


BACKEND = OnnxRuntimeBackend
