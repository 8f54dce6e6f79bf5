"""The onnxruntime backend: contract, KV cache, sequences, typed errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.errors import (
    BackendUnavailableError,
    ContextOverflowError,
    InferenceError,
    ShardLoadError,
)
from edgemesh.sharding.package.manifest import sha256_file
from tests.fixtures.tiny_models import shared_tiny_package

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def package():
    return shared_tiny_package("qwen3")


@pytest.fixture
def options(tmp_path):
    return BackendOptions(threads=1, cache_dir=tmp_path / "ranges", max_sequences=4)


def _backend(package, start, stop, options, precision="fp32", **kw):
    from edgemesh.backends.onnxruntime import OnnxRuntimeBackend

    num = json.loads((package / "manifest.json").read_text())["num_layers"]
    return OnnxRuntimeBackend(
        ShardSpec(package, LayerRange(start, stop), num, precision), options, **kw
    )


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 300, size=n).astype(np.int64)


def test_registry_finds_it_with_its_capabilities() -> None:
    cls = registry.get("onnxruntime")
    assert cls.name == "onnxruntime" and cls.extra == "onnx" and cls.module == "onnxruntime"
    assert cls.capabilities.partial_ranges
    assert set(cls.capabilities.precisions) == {"fp32", "fp16", "int8", "int4"}
    assert cls.available() is None


def test_prefill_then_decode_equals_one_long_prefill(package, options) -> None:
    """The KV cache carried between calls gives the logits a single pass gives."""
    ids = _ids(12)
    with _backend(package, 0, 3, options) as whole:
        once = whole.forward([SeqInput(1, 0, tokens=ids, logits="all")])[0]  # [12, V]
        step = [whole.forward([SeqInput(2, 0, tokens=ids[:5], logits="all")])[0]]
        for pos in range(5, 12):
            step.append(whole.forward([SeqInput(2, pos, tokens=ids[pos : pos + 1])])[0])
    stepped = np.concatenate(step)
    assert once.shape == stepped.shape == (12, whole.vocab_size)
    np.testing.assert_allclose(stepped, once, atol=1e-4, rtol=1e-4)


def test_hidden_states_flow_between_ranges(package, options) -> None:
    ids = _ids(6)
    with (
        _backend(package, 0, 1, options) as first,
        _backend(package, 1, 3, options) as last,
        _backend(package, 0, 3, options) as whole,
    ):
        hidden = first.forward([SeqInput(0, 0, tokens=ids)])[0]
        assert hidden.shape == (6, first.hidden_size) and hidden.dtype == np.float32
        logits = last.forward([SeqInput(0, 0, hidden=hidden)])[0]
        want = whole.forward([SeqInput(0, 0, tokens=ids)])[0]
    assert logits.shape == (1, whole.vocab_size)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_sequences_in_one_batch_do_not_mix(package, options) -> None:
    a, b = _ids(7, 1), _ids(4, 2)
    with _backend(package, 0, 3, options) as be:
        alone_a = be.forward([SeqInput(10, 0, tokens=a)])[0]
        alone_b = be.forward([SeqInput(11, 0, tokens=b)])[0]
        both = be.forward([SeqInput(20, 0, tokens=a), SeqInput(21, 0, tokens=b)])
        # Next step of both, together, at different cache lengths.
        nxt = be.forward([SeqInput(20, 7, tokens=b[:1]), SeqInput(21, 4, tokens=a[:1])])
        ref_a = be.forward([SeqInput(10, 7, tokens=b[:1])])[0]
        ref_b = be.forward([SeqInput(11, 4, tokens=a[:1])])[0]
    np.testing.assert_allclose(both[0], alone_a, atol=1e-6)
    np.testing.assert_allclose(both[1], alone_b, atol=1e-6)
    np.testing.assert_allclose(nxt[0], ref_a, atol=1e-6)
    np.testing.assert_allclose(nxt[1], ref_b, atol=1e-6)


def test_io_binding_matches_plain_runs(package, options) -> None:
    ids = _ids(5)
    outs = []
    for bound in (True, False):
        with _backend(package, 0, 3, options, io_binding=bound) as be:
            seq = [be.forward([SeqInput(0, 0, tokens=ids)])[0]]
            seq += [be.forward([SeqInput(0, 5 + i, tokens=ids[i : i + 1])])[0] for i in range(3)]
            outs.append(np.concatenate(seq))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_release_rewind_and_position_checks(package, options) -> None:
    ids = _ids(6)
    with _backend(package, 0, 3, options) as be:
        first = be.forward([SeqInput(0, 0, tokens=ids)])[0]
        with pytest.raises(InferenceError, match="starts at position 9"):
            be.forward([SeqInput(0, 9, tokens=ids[:1])])
        # Rewinding to an earlier position replays from the cached prefix.
        be.forward([SeqInput(0, 6, tokens=ids[:2])])
        again = be.forward([SeqInput(0, 5, tokens=ids[5:6])])[0]
        np.testing.assert_allclose(again, first, atol=1e-5)
        be.release(0)
        be.release(12345)  # unknown ids are ignored
        with pytest.raises(InferenceError, match="starts at position 3"):
            be.forward([SeqInput(0, 3, tokens=ids[:1])])
        for seq in range(4):
            be.forward([SeqInput(100 + seq, 0, tokens=ids[:1])])
        with pytest.raises(InferenceError, match="slots are busy"):
            be.forward([SeqInput(200, 0, tokens=ids[:1])])


def test_wrong_inputs_raise_typed_errors(package, tmp_path) -> None:
    opts = BackendOptions(threads=1, cache_dir=tmp_path / "r", context_length=8)
    with _backend(package, 1, 3, opts) as middle:
        with pytest.raises(InferenceError, match="hidden states"):
            middle.forward([SeqInput(0, 0, tokens=_ids(2))])
        with pytest.raises(InferenceError):
            middle.forward([SeqInput(0, 0, hidden=np.zeros((2, 7), np.float32))])
    with _backend(package, 0, 1, opts) as first:
        with pytest.raises(ContextOverflowError):
            first.forward([SeqInput(0, 0, tokens=_ids(9))])
    closed = _backend(package, 0, 1, opts)
    closed.close()
    closed.close()
    with pytest.raises(InferenceError, match="closed"):
        closed.forward([SeqInput(0, 0, tokens=_ids(1))])


def test_a_graph_onnxruntime_refuses_is_a_shard_load_error(package, tmp_path) -> None:
    """Native load failures surface as ShardLoadError, not a pybind exception."""
    import onnx

    root = tmp_path / "pkg"
    shutil.copytree(package, root)
    graph = root / "fp32" / "layer_000.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    model.graph.node[0].op_type = "NoSuchOperator"  # valid protobuf, unknown op
    graph.write_bytes(model.SerializeToString())
    manifest = json.loads((root / "manifest.json").read_text())
    for art in manifest["artifacts"]:  # re-sign so the hash check passes
        if art["path"] == "fp32/layer_000.onnx":
            art["sha256"], art["bytes"] = sha256_file(graph), graph.stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardLoadError, match="NoSuchOperator"):
        _backend(root, 0, 1, BackendOptions(cache_dir=tmp_path / "r"))


def test_device_selection(package) -> None:
    from edgemesh.backends.onnxruntime import select_providers

    assert select_providers(ort, "cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
            select_providers(ort, "cuda")
        assert select_providers(ort, "auto") == ["CPUExecutionProvider"]
    else:
        assert select_providers(ort, "cuda:0")[0][0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_every_precision_loads_and_runs(package, options, precision) -> None:
    with _backend(package, 0, 3, options, precision) as be:
        out = be.forward([SeqInput(0, 0, tokens=_ids(4))])[0]
    assert out.shape == (1, be.vocab_size) and np.isfinite(out).all()
