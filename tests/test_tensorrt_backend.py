"""TensorRT: engine tests need an NVIDIA GPU and skip with the reason otherwise.

The graph preparation for int8/int4 (MatMulNBits -> weight-only
DequantizeLinear + MatMul, opset 21) runs anywhere and is checked here on
onnxruntime against the package's own int8/int4 graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.backends.tensorrt import weight_only_graph
from edgemesh.errors import BackendUnavailableError
from tests.fixtures.tiny_models import shared_tiny_package

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

REASON = registry.get("tensorrt").available()


def _feeds(layers: int, n: int) -> dict[str, np.ndarray]:
    feeds = {
        "input_ids": np.arange(5, 5 + n, dtype=np.int64)[None],
        "position_ids": np.arange(n, dtype=np.int64)[None],
        "key_position": np.arange(n, dtype=np.int64)[None],
        "logit_index": np.arange(n, dtype=np.int64),
    }
    for i in range(layers):
        for kind in ("past_key", "past_value"):
            feeds[f"{kind}.{i}"] = np.zeros((1, 2, 0, 16), np.float32)
    return feeds


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_rewrite_matches_the_package_graph(precision: str, tmp_path: Path) -> None:
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(shared_tiny_package("qwen3"))
    graph = pkg.range_graph(0, 3, precision, tmp_path / "ranges")
    out = weight_only_graph(graph, tmp_path / "wo" / "range.onnx")
    model = onnx.load(str(out), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" not in ops and "DequantizeLinear" in ops
    assert {o.domain: o.version for o in model.opset_import} == {"": 21}
    feeds = _feeds(3, 12)
    want = ort.InferenceSession(str(graph)).run(["logits"], feeds)[0]
    plain = ort.SessionOptions()
    # No graph optimisation: onnxruntime would otherwise fuse DQ+MatMul back
    # into MatMulNBits and compare the original with itself.
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(out), plain).run(["logits"], feeds)[0]
    assert got.shape == want.shape == (1, 12, pkg.manifest.vocab_size)
    # The package's MatMulNBits quantise activations to int8 (accuracy_level 4);
    # the rewrite multiplies exact fp32 activations: a few percent apart, no more.
    assert float(np.abs(got - want).max()) < 5e-2 * float(np.abs(want).max())


def test_unavailable_here_says_why() -> None:
    if REASON is None:
        pytest.skip("TensorRT and an NVIDIA GPU are present")
    assert "tensorrt" in REASON.lower() or "nvidia" in REASON.lower()
    spec = ShardSpec(shared_tiny_package("qwen3"), LayerRange(0, 3), 3)
    with pytest.raises(BackendUnavailableError):
        registry.get("tensorrt")(spec)


@pytest.mark.gpu
@pytest.mark.hardware
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT: {REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_engine_matches_onnxruntime_and_is_cached(precision: str, tmp_path: Path) -> None:
    from edgemesh.backends.onnxruntime import OnnxRuntimeBackend

    package = shared_tiny_package("qwen3")
    opts = BackendOptions(cache_dir=tmp_path, context_length=512)
    spec = ShardSpec(package, LayerRange(0, 3), 3, precision)
    ids = np.arange(5, 309, dtype=np.int64) % 300  # 300-token prompt: two prefill chunks
    with registry.get("tensorrt")(spec, opts) as trt:
        got = [trt.forward([SeqInput(0, 0, tokens=ids[:300])])[0]]
        got += [trt.forward([SeqInput(0, p, tokens=ids[p : p + 1])])[0] for p in range(300, 304)]
        assert trt.kv_bytes() > 0
        trt.release(0)
        assert trt.kv_bytes() == 0
    engines = list((tmp_path / "tensorrt").glob("*.engine"))
    assert len(engines) == 1
    with OnnxRuntimeBackend(ShardSpec(package, LayerRange(0, 3), 3, "fp32"), opts) as ref:
        want = [ref.forward([SeqInput(0, 0, tokens=ids[:300])])[0]]
        want += [ref.forward([SeqInput(0, p, tokens=ids[p : p + 1])])[0] for p in range(300, 304)]
    tol = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.2, "int4": 1.0}[precision]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.abs(g - w).max() < tol * np.abs(w).max()
    with registry.get("tensorrt")(spec, opts):  # cache hit: no second engine
        pass
    assert list((tmp_path / "tensorrt").glob("*.engine")) == engines
