"""TensorRT backend: one engine per layer range, built from the range's ONNX graph.

Written against TensorRT's native Python API (``tensorrt>=10``):
``Builder`` + ``OnnxParser`` + two optimisation profiles build a serialized
engine; ``Runtime.deserialize_cuda_engine`` + ``execute_async_v3`` run it.

* **Dynamic shapes.** Two profiles, one execution context each
  (``set_optimization_profile_async``): *decode* covers batch
  ``1..MAX_BATCH`` with one new token per row (the padded decode batch of
  ``RangeGraphBackend``), *prompt* covers batch 1 with ``1..PREFILL_CHUNK``
  new tokens; both take ``0..context_length - 1`` cached tokens. Longer
  prompts are fed in chunks of ``PREFILL_CHUNK`` tokens (``max_new_tokens``).
  One profile for both would size the logits for ``MAX_BATCH x
  PREFILL_CHUNK`` rows of the 262k vocabulary.
* **Precisions.** ``fp32``: the fp32 graph as is. ``fp16``: the fp32 graph
  with ``BuilderFlag.FP16`` (TensorRT keeps norms/softmax where it must).
  ``int8``/``int4``: the package's ``com.microsoft.MatMulNBits`` weights,
  which TensorRT's parser does not know, are rewritten into standard
  weight-only ``DequantizeLinear`` (opset 21, block-wise scales, the same
  bytes) followed by ``MatMul`` (``weight_only_graph``), which TensorRT
  runs as weight-only quantised GEMMs; the rewrite is checked against the
  original on onnxruntime by the tests, so it is verified without a GPU.
* **Engine cache.** ``<cache>/tensorrt/<key>.engine`` with ``key`` = sha256
  of (GPU name, compute capability, TensorRT version, graph sha256,
  precision, profile). A new driver/GPU/TensorRT or a re-converted package
  builds a new engine; a hit loads in well under a second.
* **Buffers.** CUDA memory is torch CUDA tensors (torch is already the
  converter's dependency; cuda-python would be one more): inputs are copied
  once to the device, each sequence's KV ``present`` tensors are allocated
  on the device for the call that writes them and bound as the next call's
  ``past``; only the hidden states or logits come back to the host.

This module is the only place edgemesh imports ``tensorrt``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
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
from edgemesh.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptArtifactError,
    InferenceError,
    ShardLoadError,
    require,
)

log = logging.getLogger(__name__)

MAX_BATCH = 16
PREFILL_CHUNK = 256
WORKSPACE_BYTES = 2 << 30
ENGINE_FORMAT = 2  # 2: key_position input, decode + prompt profiles


# -- graph preparation (runs anywhere; tested on onnxruntime) ------------------


def weight_only_graph(src: Path, dst: Path) -> Path:
    """Rewrite ``MatMulNBits`` nodes into ``DequantizeLinear -> MatMul`` (opset 21).

    MatMulNBits stores ``B [N, K/block, block*bits/8]`` uint8 (value + 2^(bits-1),
    low nibble first) and ``scales [N, K/block]``. The rewrite keeps the same
    quantised values as signed ``INT8``/``INT4`` ``W [K, N]`` with block-wise
    ``scales [K/block, N]`` along axis 0, which is the weight-only form
    TensorRT 10 fuses into its GEMMs. Writes ``dst`` (+ ``dst.data``).
    """
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper, version_converter

    from edgemesh.sharding.package.blocks import dequantize
    from edgemesh.sharding.package.folder import write_piece

    model = onnx.load(str(src))  # loads the external weights too
    # Lift the standard ops to opset 21 (block-wise DequantizeLinear lives
    # there) first; the converter leaves the com.microsoft nodes alone.
    model = version_converter.convert_version(model, 21)
    inits = {i.name: i for i in model.graph.initializer}
    nodes: list[Any] = []
    new_inits: list[Any] = []
    dropped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block, k, n = attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]
        a_in, b_name, s_name = node.input[0], node.input[1], node.input[2]
        packed = numpy_helper.to_array(inits[b_name])
        scales = numpy_helper.to_array(inits[s_name]).reshape(n, -1)  # [N, K/block]
        blocks = scales.shape[1]
        if blocks * block != k:
            raise ConfigError(f"{node.name}: K={k} is not a multiple of block {block}")
        # Recover the integer codes: dequantize with unit scales gives q - 2^(bits-1).
        codes = dequantize(packed, np.ones_like(scales), bits, k)  # [N, K] float
        weight = np.ascontiguousarray(codes.T.astype(np.int8))  # [K, N]
        kind = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        w_name, q_scale = f"{b_name}.wo", f"{s_name}.wo"
        w_tensor = helper.make_tensor(w_name, kind, weight.shape, weight.flatten().tolist())
        new_inits += [w_tensor, numpy_helper.from_array(scales.T.copy(), q_scale)]
        dropped.update((b_name, s_name))
        deq = f"{node.output[0]}.w"
        nodes.append(
            helper.make_node("DequantizeLinear", [w_name, q_scale], [deq], axis=0, block_size=block)
        )
        nodes.append(helper.make_node("MatMul", [a_in, deq], [node.output[0]], name=node.name))
    graph = model.graph
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    kept_opsets = [o for o in model.opset_import if o.domain != "com.microsoft"]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    model.ir_version = max(model.ir_version, 10)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_piece(model, dst.parent, dst.name)
    return dst


# -- the backend ------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class TensorRtBackend(RangeGraphBackend):
    """A layer range of an edgemesh package as a TensorRT engine on one NVIDIA GPU."""

    name = "tensorrt"
    label = "TensorRT"
    max_new_tokens = PREFILL_CHUNK
    module = "tensorrt"
    extra = "tensorrt"
    preferred_precision = "fp16"  # fast fp16 tensor cores
    capabilities = Capabilities(
        partial_ranges=True,
        precisions=PRECISIONS,
        artifact_format="onnx",
        max_batch=MAX_BATCH,
        needs_compiled_artifact=True,
        devices=("cuda",),
    )

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        return 50 if {"nvidia-gpu", "jetson-gpu"} & set(box.accelerators) else None

    @classmethod
    def available(cls) -> str | None:
        reason = super().available()
        if reason is not None:
            return reason
        if importlib.util.find_spec("torch") is None:
            return "TensorRT buffers are torch CUDA tensors: pip install torch (a CUDA build)"
        if not nvidia_gpu_present():
            return "no NVIDIA GPU here (no /proc/driver/nvidia/gpus, no /dev/nvidia0)"
        return None

    def __init__(self, shard: ShardSpec, options: Any = None) -> None:
        super().__init__(shard, options)
        reason = self.available()
        if reason is not None:
            raise BackendUnavailableError(f"TensorRT cannot run here: {reason}")
        self._trt = require("tensorrt", "tensorrt")
        self._torch = require("torch", "convert")
        if not self._torch.cuda.is_available():
            raise BackendUnavailableError(
                "torch has no CUDA here", hint="install a CUDA build of torch next to TensorRT"
            )
        from edgemesh.sharding.package.folder import default_cache_dir

        package = self._open_range()
        start, stop = shard.layers.start, shard.layers.stop
        index = int(self.options.device.partition(":")[2] or 0)
        self._device = self._torch.device("cuda", index)
        cache = Path(self.options.cache_dir or default_cache_dir())
        # fp16 is a builder flag on the fp32 graph; int8/int4 start from their pieces.
        source = "fp32" if shard.precision in ("fp32", "fp16") else shard.precision
        graph = package.range_graph(start, stop, source, cache)
        if shard.precision in ("int8", "int4"):
            graph = self._weight_only(graph, cache)
        self._engine = self._load_engine(graph, cache / "tensorrt")
        self._stream = self._torch.cuda.Stream(device=self._device)
        self._contexts = []  # [decode, prompt]: one per optimisation profile
        for index in range(len(self._profiles())):
            context = self._engine.create_execution_context()
            if context is None:
                raise ShardLoadError("TensorRT could not create an execution context (GPU memory?)")
            context.set_optimization_profile_async(index, self._stream.cuda_stream)
            self._contexts.append(context)

    # -- engine build / cache -------------------------------------------

    def _weight_only(self, graph: Path, cache: Path) -> Path:
        out = graph.parent / "weight_only" / "range.onnx"
        if not out.is_file():
            weight_only_graph(graph, out)
        return out

    def _profiles(self) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
        """(min, opt, max) shapes per input: the decode profile, then the prompt one."""
        ctx, chunk, kvh, d = self.context_length, PREFILL_CHUNK, self._kv_heads, self._head_dim
        out = []
        for batch, seq, rows in ((MAX_BATCH, 1, 1), (1, chunk, chunk)):
            shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
            lo, hi = (1, 1), (batch, seq)
            if self._first:
                shapes["input_ids"] = (lo, lo, hi)
            else:
                h = self.hidden_size
                shapes["hidden_in"] = ((*lo, h), (*lo, h), (*hi, h))
            shapes["position_ids"] = (lo, lo, hi)
            shapes["key_position"] = ((1, 1), (1, ctx // 2), (batch, ctx))
            for layer in self._layers:
                for kind in ("past_key", "past_value"):
                    shapes[f"{kind}.{layer}"] = (
                        (1, kvh, 0, d),
                        (1, kvh, ctx // 2, d),
                        (batch, kvh, ctx - 1, d),
                    )
            if self._last:
                shapes["logit_index"] = ((1,), (1,), (rows,))
            out.append(shapes)
        return out

    def _cache_key(self, graph: Path) -> str:
        torch = self._torch
        props = torch.cuda.get_device_properties(self._device)
        blob = json.dumps(
            {
                "format": ENGINE_FORMAT,
                "gpu": props.name,
                "cc": [props.major, props.minor],
                "tensorrt": self._trt.__version__,
                "graph": _sha256(graph),
                "data": (graph.parent / "range.json").read_text()
                if (graph.parent / "range.json").is_file()
                else _sha256(graph.with_name(graph.name + ".data")),
                "precision": self.shard.precision,
                "profiles": self._profiles(),
            },
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    def _load_engine(self, graph: Path, cache: Path) -> Any:
        trt = self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        path = cache / f"{self._cache_key(graph)}.engine"
        if path.is_file():
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise CorruptArtifactError(str(path), "TensorRT could not deserialize it")
            log.info("tensorrt: engine cache hit %s", path.name)
            return engine
        blob = self._build(graph, logger)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise ShardLoadError(f"TensorRT built an engine it cannot load ({path})")
        return engine

    def _build(self, graph: Path, logger: Any) -> bytes:
        trt = self._trt
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ShardLoadError(
                f"TensorRT's ONNX parser rejected layers {self.shard.layers}: {errors}"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if self.shard.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        for shapes in self._profiles():
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        log.info("tensorrt: building layers %s at %s", self.shard.layers, self.shard.precision)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ShardLoadError(
                f"TensorRT could not build an engine for layers {self.shard.layers} "
                f"({self.shard.precision}); see the TensorRT log above"
            )
        return bytes(blob)

    # -- contract ---------------------------------------------------------

    def _free(self) -> None:
        self._contexts = []
        self._engine = None

    def _kv_nbytes(self, kv: Any) -> int:
        return int(kv.numel() * kv.element_size())

    def _kv_host(self, kv: Any) -> np.ndarray:
        return kv.cpu().numpy()

    def _kv_device(self, array: np.ndarray) -> Any:
        with self._torch.cuda.stream(self._stream):
            return self._torch.as_tensor(array).to(self._device, non_blocking=False)

    def _kv_empty(self, batch: int) -> Any:
        shape = (batch, self._kv_heads, 0, self._head_dim)
        return self._torch.empty(shape, dtype=self._torch.float32, device=self._device)

    def _run_graph(
        self, feeds: dict[str, np.ndarray], past: list[Any], main: str | None = None
    ) -> tuple[np.ndarray, list[Any]]:
        if main is not None:  # never asked: can_pool stays False (no hidden_norm here)
            raise InferenceError(f"the TensorRT engine has no '{main}' output")
        # Everything (copies in, the engine, allocations) is queued on one stream,
        # so no cross-stream synchronisation is needed until the final host copy.
        with self._torch.cuda.stream(self._stream):
            return self._run_on_stream(feeds, past)

    def _run_on_stream(
        self, feeds: dict[str, np.ndarray], past: list[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        torch, dev = self._torch, self._device
        batch, seq = feeds["position_ids"].shape
        if batch > MAX_BATCH:
            raise InferenceError(
                f"TensorRT's decode profile takes {MAX_BATCH} sequences; got {batch}",
                hint=f"run at most {MAX_BATCH} sequences per box (max_sequences)",
            )
        ctx = self._contexts[0 if seq == 1 else 1]
        inputs: dict[str, Any] = {n: torch.as_tensor(a).to(dev) for n, a in feeds.items()}
        for j, layer in enumerate(self._layers):
            inputs[f"past_key.{layer}"] = past[2 * j]
            inputs[f"past_value.{layer}"] = past[2 * j + 1]
        for name, tensor in inputs.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs: dict[str, Any] = {}
        names = ["logits" if self._last else "hidden_out"]
        for layer in self._layers:
            names += [f"present_key.{layer}", f"present_value.{layer}"]
        for name in names:
            shape = tuple(ctx.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=dev)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise InferenceError("TensorRT's execute_async_v3 returned false")
        self._stream.synchronize()
        main = outputs[names[0]].cpu().numpy()  # [B, S|K, H|V]
        return main, [outputs[name] for name in names[1:]]


BACKEND = TensorRtBackend
