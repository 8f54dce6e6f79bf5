"""Matmul micro-benchmarks per backend and precision, at LLM decode shapes.

Each benchmark is a chain of ``layers`` matmuls ``[M, K] x [K, N]`` (K = N)
whose weights together take ``weight_bytes`` at that precision, more than
the last-level cache of an edge box, so every run streams all weights from
RAM the way a decode step does. It is timed at M = 1 (bandwidth-bound:
weight bytes per second) and at M = 8 (a small decode batch: GFLOP/s).

The runtimes are imported inside the functions: the fingerprint must stay
importable without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgemesh.errors import BackendError, MissingExtraError

REFERENCE = "cpu"
"""The numpy reference: measured on every box, the floor for unprobed backends."""
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
PRECISIONS = {
    "cpu": ("fp32",),
    "onnxruntime": ("fp32", "fp16", "int8", "int4"),
    "openvino": ("fp32", "int8", "int4"),
}
INT4_BLOCK = 32  # MatMulNBits quantization block along K


@dataclass(frozen=True)
class Shape:
    """``k``×``k`` weights, ``layers`` of them; ``decode_rows`` is M for GFLOP/s."""

    k: int
    layers: int
    decode_rows: int = 8

    @classmethod
    def for_budget(cls, precision: str, k: int, weight_bytes: int) -> Shape:
        per_layer = k * k * BYTES_PER_PARAM[precision]
        return cls(k=k, layers=max(1, int(weight_bytes // per_layer)))

    def weight_bytes(self, precision: str) -> float:
        return self.k * self.k * self.layers * BYTES_PER_PARAM[precision]

    def flops(self, rows: int) -> float:
        return 2.0 * rows * self.k * self.k * self.layers


def _filler(shape: tuple[int, ...], dtype: type, seed: int) -> np.ndarray:
    """Weights of the given shape without paying for millions of random
    draws: a random block repeated (values do not change matmul speed)."""
    rng = np.random.default_rng(seed)
    block_rows = min(64, shape[0])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        block = rng.integers(info.min, info.max, (block_rows, *shape[1:]), dtype=dtype)
    else:
        # Scaled so activations stay near 1 through the chain (no denormals).
        scale = 1.0 / np.sqrt(shape[0])
        block = (rng.standard_normal((block_rows, *shape[1:])) * scale).astype(dtype)
    reps = -(-shape[0] // block_rows)
    return np.ascontiguousarray(np.tile(block, (reps,) + (1,) * (len(shape) - 1))[: shape[0]])


def time_runs(run: Callable[[], object], seconds: float, max_runs: int = 200) -> float:
    """Median seconds per call after two warm-up calls (the median, not the
    best, because the box may be busy with other work)."""
    run()
    run()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < max_runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def numpy_runner(precision: str, shape: Shape, threads: int) -> Callable[[np.ndarray], object]:
    """The ``cpu`` reference: numpy's BLAS at fp32 (its own thread count)."""
    del threads  # numpy's BLAS picks its own thread count
    weights = [_filler((shape.k, shape.k), np.float32, i) for i in range(shape.layers)]

    def run(x: np.ndarray) -> np.ndarray:
        for w in weights:
            x = x @ w  # x: [M, K] -> [M, K]
        return x

    return run


def _onnx_model(precision: str, shape: Shape) -> bytes:
    """The matmul chain as an ONNX graph; int8 and int4 use com.microsoft
    MatMulNBits with 32-wide blocks, like the converted packages."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise MissingExtraError("onnx", "onnx") from exc

    k = shape.k
    elem = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    nodes, inits = [], []
    x = "x"
    for i in range(shape.layers):
        y = "y" if i == shape.layers - 1 else f"h{i}"
        w, s = f"w{i}", f"s{i}"
        if precision in ("fp32", "fp16"):
            dtype = np.float16 if precision == "fp16" else np.float32
            inits.append(numpy_helper.from_array(_filler((k, k), dtype, i), w))
            nodes.append(helper.make_node("MatMul", [x, w], [y]))
        else:
            # MatMulNBits, as the converted packages store int8/int4 weights
            # (sharding/convert/quantize.py), so the figure describes the kernel that
            # will run: B is [N, K/block, block*bits/8] uint8, one scale a block.
            bits = 8 if precision == "int8" else 4
            blocks = k // INT4_BLOCK
            packed = _filler((k, blocks, INT4_BLOCK * bits // 8), np.uint8, i)
            inits.append(numpy_helper.from_array(packed, w))
            scales = np.full(k * blocks, 1 / (2 ** (bits - 1) * np.sqrt(k)), np.float32)
            inits.append(numpy_helper.from_array(scales, s))
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, w, s],
                    [y],
                    domain="com.microsoft",
                    K=k,
                    N=k,
                    bits=bits,
                    block_size=INT4_BLOCK,
                    accuracy_level=4,  # int8 activations: the fast CPU path
                )
            )
        x = y
    graph = helper.make_graph(
        nodes,
        f"matmul_{precision}",
        [helper.make_tensor_value_info("x", elem, ["M", k])],
        [helper.make_tensor_value_info("y", elem, ["M", k])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9  # what onnxruntime >= 1.16 reads
    return model.SerializeToString()


def onnxruntime_runner(
    precision: str, shape: Shape, threads: int
) -> Callable[[np.ndarray], object]:
    """An onnxruntime CPU session on the chain; BackendError if the op or
    precision has no CPU kernel in this build."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    except ImportError as exc:
        raise MissingExtraError("onnxruntime", "onnx") from exc

    # onnxruntime's own exceptions derive from Exception, not RuntimeError.
    refused = (
        ort_errors.Fail,
        ort_errors.NotImplemented,
        ort_errors.InvalidGraph,
        ort_errors.InvalidArgument,
        ort_errors.RuntimeException,
        RuntimeError,
        ValueError,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            _onnx_model(precision, shape), options, providers=["CPUExecutionProvider"]
        )
    except refused as exc:
        raise BackendError(f"onnxruntime cannot run {precision} MatMul here: {exc}") from exc
    dtype = np.float16 if precision == "fp16" else np.float32

    def run(x: np.ndarray) -> object:
        return session.run(None, {"x": x.astype(dtype, copy=False)})

    return run


def openvino_runner(precision: str, shape: Shape, threads: int) -> Callable[[np.ndarray], object]:
    """The same ONNX chain the onnxruntime figure runs (so int8/int4 are the
    packages' MatMulNBits, which OpenVINO's ONNX reader maps onto its
    compressed-weight kernels), compiled for CPU at f32 activations (so a bf16
    default on AMX CPUs does not blur the comparison)."""
    import tempfile
    from pathlib import Path

    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingExtraError("openvino", "openvino") from exc

    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"matmul_{precision}.onnx"
        path.write_bytes(_onnx_model(precision, shape))
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"OpenVINO cannot compile {precision} MatMul here: {exc}") from exc
    request = compiled.create_infer_request()

    def run(a: np.ndarray) -> object:
        return request.infer({0: a.astype(np.float16 if precision == "fp16" else np.float32)})

    return run


RUNNERS: dict[str, Callable[[str, Shape, int], Callable[[np.ndarray], object]]] = {
    "cpu": numpy_runner,
    "onnxruntime": onnxruntime_runner,
    "openvino": openvino_runner,
}


def bench_matmul(
    backend: str, precision: str, shape: Shape, threads: int, seconds: float
) -> tuple[float, float]:
    """(GFLOP/s at M = ``decode_rows``, weight GB/s at M = 1) for one pair."""
    run = RUNNERS[backend](precision, shape, threads)
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, shape.k)).astype(np.float32)  # [1, K]
    batch = rng.standard_normal((shape.decode_rows, shape.k)).astype(np.float32)  # [M, K]
    t_one = time_runs(lambda: run(one), seconds / 2)
    t_batch = time_runs(lambda: run(batch), seconds / 2)
    gflops = shape.flops(shape.decode_rows) / t_batch / 1e9
    bandwidth = shape.weight_bytes(precision) / t_one / 1e9
    return gflops, bandwidth


def memory_bandwidth(nbytes: int, seconds: float = 0.5) -> float:
    """GB/s of a large array copy, counting bytes read plus bytes written
    (as STREAM's Copy does)."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch: page faults are not bandwidth
    t = time_runs(lambda: np.copyto(dst, src), seconds, max_runs=20)
    return 2 * src.nbytes / t / 1e9
