"""OpenVINO backend: any layer range of a converted package on OpenVINO's runtime.

Loading verifies and composes the range graph exactly as onnxruntime does
(``Package.range_graph``), then compiles it with OpenVINO for ``CPU`` (or
``GPU`` when ``BackendOptions.device`` asks for it and the box has one).

Precisions. OpenVINO has no int8/int4 *weight compression* of its own
without NNCF; what it has is a runtime for compressed weights: integer
constants followed by ``Convert -> Subtract(zero point) -> Multiply(scale)``,
which the CPU plugin folds into a fully-connected kernel that reads the
packed weights directly. Its ONNX frontend decomposes the package's
``com.microsoft.MatMulNBits`` (int8/int4, 32 weights per scale) into exactly
that pattern, so the int8/int4 pieces run as OpenVINO-compressed weights
with no re-quantisation (``compressed_weight_types`` reports what the
compiled model kept). ``fp16`` runs the package's fp16 pieces.

Compiled-model cache: ``BackendOptions.cache_dir`` (or the package's range
cache) holds OpenVINO's ``CACHE_DIR`` blobs, keyed by OpenVINO on the graph
file and the compile options; the graph's path already carries the sha256
of its pieces, so a changed package never hits a stale blob.

KV cache: ``RangeGraphBackend`` (``backends/batching.py``) keeps the
caches and runs all decode rows of a call as one padded batch; here each
``present`` is an ``ov.Tensor`` allocated for the call that produces it
(the request writes straight into it) and bound as the next call's
``past``, so nothing is copied through numpy between steps.

This module is the only place edgemesh imports ``openvino``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.base import PRECISIONS, BoxFacts, Capabilities, ShardSpec
from edgemesh.backends.batching import RangeGraphBackend
from edgemesh.errors import BackendUnavailableError, ConfigError, ShardLoadError, require

log = logging.getLogger(__name__)


def select_device(core: Any, device: str) -> str:
    """OpenVINO device name for ``device`` (``cpu``, ``gpu[:N]``, ``auto``)."""
    available = list(core.available_devices)
    kind, _, index = device.lower().partition(":")
    if kind == "auto":
        return "GPU" if any(d.startswith("GPU") for d in available) else "CPU"
    if kind == "cpu":
        return "CPU"
    if kind == "gpu":
        name = f"GPU.{index}" if index else "GPU"
        if not any(d == name or (not index and d.startswith("GPU")) for d in available):
            raise BackendUnavailableError(
                f"OpenVINO sees no {name} here (devices: {', '.join(available)})",
                hint="install the Intel GPU compute runtime or run this shard on cpu",
            )
        return name
    raise ConfigError(f"OpenVINO cannot run on device '{device}'", hint="use cpu, gpu or auto")


def exact_integer_division(model: Any, ops: Any) -> int:
    """Make integer ``Divide`` nodes floor exactly; returns how many were rewritten.

    The ONNX frontend turns ``BitShift`` (the int4 embedding's nibble
    unpacking) into an integer ``Divide`` by 2^n, and the CPU plugin runs u8
    division through float with round-to-nearest (174 >> 4 gave 11, not
    10). Dividing in f32 and flooring is exact for 8/16-bit integers.
    """
    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Divide":
            continue
        kind = op.get_output_element_type(0)
        if not kind.is_integral() or not op.get_attributes().get("m_pythondiv", True):
            continue
        num = ops.convert(op.input_value(0), "f32")
        den = ops.convert(op.input_value(1), "f32")
        exact = ops.convert(ops.floor(ops.divide(num, den)), kind)
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(exact.output(0))
        count += 1
    return count


def compile_options(ov_props: Any, threads: int | None) -> dict[Any, Any]:
    """Compile-time properties: latency mode, exact fp32 activations, thread count."""
    hints = ov_props.hint
    config: dict[Any, Any] = {
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.num_requests: 1,
        # f32 activations: bf16/f16 inference precision would change results
        # between boxes with and without AMX/AVX512-FP16.
        hints.inference_precision: "f32",
    }
    if threads:
        config[ov_props.inference_num_threads] = int(threads)
    return config


class OpenVinoBackend(RangeGraphBackend):
    """A layer range of an edgemesh package on OpenVINO (CPU, or an Intel GPU)."""

    name = "openvino"
    label = "OpenVINO"
    module = "openvino"
    extra = "openvino"
    matmul_probe = "openvino"
    capabilities = Capabilities(
        partial_ranges=True,
        precisions=PRECISIONS,
        artifact_format="onnx",
        max_batch=64,
        needs_compiled_artifact=False,
        devices=("cpu", "gpu"),
    )

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        # Intel's own CPUs; on AMD its kernels are not the better choice.
        intel = box.arch in ("x86_64", "i686") and box.cpu_vendor == "GenuineIntel"
        return 30 if intel else None

    @classmethod
    def device_unavailable(cls, device: str) -> str | None:
        if device.partition(":")[0].lower() != "gpu":
            return super().device_unavailable(device)
        ov = require("openvino", "openvino")
        try:
            select_device(ov.Core(), device)
        except BackendUnavailableError as exc:
            return str(exc)
        return None

    def __init__(self, shard: ShardSpec, options: Any = None) -> None:
        super().__init__(shard, options)
        ov = require("openvino", "openvino")
        from edgemesh.sharding.package.folder import default_cache_dir

        self._ov = ov
        package = self._open_range()
        start, stop = shard.layers.start, shard.layers.stop
        # The last range also exposes hidden_norm (embeddings); read only when asked.
        extra = ("hidden_norm",) if self._last else ()
        path = package.range_graph(
            start, stop, shard.precision, self.options.cache_dir, outputs=extra
        )
        core = ov.Core()
        self.device = select_device(core, self.options.device)
        cache = Path(self.options.cache_dir or default_cache_dir()) / "openvino"
        try:
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({ov.properties.cache_dir: str(cache)})
            model = core.read_model(str(path))
            fixed = exact_integer_division(model, ov.opset13)
            if fixed:
                log.debug("openvino: %d integer divisions made exact", fixed)
            self._compiled = core.compile_model(
                model, self.device, compile_options(ov.properties, self.options.threads)
            )
            self._request = self._compiled.create_infer_request()
        except RuntimeError as exc:  # OpenVINO raises RuntimeError subclasses (ov::Exception)
            raise ShardLoadError(
                f"OpenVINO could not compile layers {shard.layers} ({shard.precision}) of "
                f"'{package.manifest.name}' for {self.device}: {exc}"
            ) from exc
        self._main_out = "logits" if self._last else "hidden_out"
        self.can_pool = any("hidden_norm" in o.get_names() for o in self._compiled.outputs)
        log.info(
            "openvino: layers %s at %s on %s (%s)",
            shard.layers,
            shard.precision,
            self.device,
            path.parent.name,
        )

    # -- contract ---------------------------------------------------------

    def _free(self) -> None:
        self._request = None
        self._compiled = None

    # -- introspection ----------------------------------------------------

    def matmul_precisions(self) -> set[str]:
        """Runtime precisions of the compiled model's fully-connected kernels.

        ``{"u4"}`` for int4 and ``{"u8"}`` for int8 pieces show the CPU plugin
        kept the weights compressed and runs its compressed-weight kernels;
        ``{"f32"}`` for fp32.
        """
        found: set[str] = set()
        for op in self._compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "FullyConnected":
                found.add(info["runtimePrecision"].astype(str))
        return found

    # -- internals --------------------------------------------------------

    def _kv_nbytes(self, kv: Any) -> int:
        return int(kv.byte_size)

    def _kv_host(self, kv: Any) -> np.ndarray:
        return kv.data

    def _kv_device(self, array: np.ndarray) -> Any:
        return self._ov.Tensor(np.ascontiguousarray(array, dtype=np.float32))

    def _kv_empty(self, batch: int, tokens: int = 0) -> Any:
        ov = self._ov
        return ov.Tensor(ov.Type.f32, ov.Shape([batch, self._kv_heads, tokens, self._head_dim]))

    def _run_graph(
        self, feeds: dict[str, np.ndarray], past: list[Any], main: str | None = None
    ) -> tuple[np.ndarray, list[Any]]:
        ov = self._ov
        req = self._request
        for name, array in feeds.items():
            # OpenVINO refuses to share read-only memory (arrays from Ray's
            # object store): those are copied, the rest shared.
            array = np.ascontiguousarray(array)
            req.set_tensor(name, ov.Tensor(array, shared_memory=array.flags.writeable))
        batch, total = feeds["key_position"].shape  # [B, P + S]
        presents = []
        for j, layer in enumerate(self._layers):
            req.set_tensor(f"past_key.{layer}", past[2 * j])
            req.set_tensor(f"past_value.{layer}", past[2 * j + 1])
            # Fresh output tensors per call: the request writes into them and
            # they become the cache; no copy afterwards.
            for kind in ("present_key", "present_value"):
                req.set_tensor(f"{kind}.{layer}", self._kv_empty(batch, total))
                presents.append(f"{kind}.{layer}")
        req.infer()
        out = req.get_tensor(main or self._main_out).data.copy()  # [B, S|K, H|V]
        return out, [req.get_tensor(name) for name in presents]


BACKEND = OpenVinoBackend
