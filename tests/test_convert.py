"""`convert`: architectures, quantisation, tokenizer and the manifest it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgemesh.errors import ConfigError, ModelNotFoundError, UnsupportedModelError
from edgemesh.sharding.convert.architectures import spec_from_config
from edgemesh.sharding.package.blocks import blockwise, dequantize
from edgemesh.sharding.package.folder import open_package
from edgemesh.sharding.package.manifest import Manifest, sha256_file
from tests.fixtures.tiny_models import shared_tiny_package

# -- architectures -------------------------------------------------------------


def _write_config(folder, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def test_an_unsupported_architecture_is_refused_by_name(tmp_path) -> None:
    from edgemesh.sharding.convert.run import convert

    _write_config(tmp_path / "gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError) as err:
        convert(tmp_path / "gpt2", tmp_path / "out")
    assert "GPT2LMHeadModel" in str(err.value)
    assert "Gemma3ForCausalLM" in str(err.value)  # the hint lists what is supported
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_multimodal_gemma3_and_dynamic_rope_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        spec_from_config(
            {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
        )
    llama = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    }
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        spec_from_config(llama)


def test_missing_source_and_bad_precision(tmp_path) -> None:
    from edgemesh.sharding.convert.run import ConvertOptions, convert

    with pytest.raises(ModelNotFoundError):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match="int3"):
        convert(tmp_path / "empty", tmp_path / "out", ConvertOptions(precisions=("fp32", "int3")))


def test_gemma3_spec_has_its_switches() -> None:
    import transformers

    cfg = transformers.Gemma3TextConfig(
        num_hidden_layers=6, hidden_size=640, head_dim=256, sliding_window=512
    )
    spec = spec_from_config(cfg)
    assert spec.family == "gemma3" and spec.qk_norm
    assert spec.embed_scale == pytest.approx(640**0.5)
    assert spec.layer_types.count("sliding_attention") == 5
    assert spec.window("sliding_attention") == 512 and spec.window("full_attention") is None


# -- quantisation ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_quantisation_round_trips(bits) -> None:
    w = np.random.default_rng(0).standard_normal((48, 100)).astype(np.float32)  # K not /32
    packed, scales = blockwise(w, bits, 32)
    assert packed.shape == (48, 4, 32 * bits // 8) and scales.shape == (48, 4)
    back = dequantize(packed, scales, bits, 100)
    qmax = 2 ** (bits - 1) - 1
    plain = np.pad(np.abs(w), ((0, 0), (0, 28))).reshape(48, 4, 32).max(-1) / qmax
    if bits == 8:  # plain absmax scales: every weight within half a step
        np.testing.assert_array_equal(scales, plain.astype(np.float32))
        assert np.all(np.abs(back - w) <= np.repeat(scales, 32, axis=1)[:, :100] / 2 + 1e-6)
    else:  # searched scales: never worse than absmax rounding, block by block
        rtn = (np.clip(np.rint(w / np.repeat(plain, 32, axis=1)[:, :100]), -8, 7)
               * np.repeat(plain, 32, axis=1)[:, :100])  # fmt: skip
        per_block = lambda x: np.pad((x - w) ** 2, ((0, 0), (0, 28))).reshape(48, 4, 32).sum(-1)  # noqa: E731
        assert np.all(per_block(back) <= per_block(rtn) + 1e-9)
        assert per_block(back).sum() < 0.95 * per_block(rtn).sum()


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_embedding_piece_returns_the_scaled_rows(precision) -> None:
    ort = pytest.importorskip("onnxruntime")
    from edgemesh.sharding.convert.quantize import embedding_model

    table = np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32)
    model = embedding_model(table, 8.0, precision, 17)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 0, 49, 3]], dtype=np.int64)
    got = sess.run(None, {"input_ids": ids})[0]  # [1, 4, 64]
    if precision == "fp16":
        want = table.astype(np.float16).astype(np.float32)[ids] * 8.0
    else:  # 8-bit rows at int8 and int4 alike
        packed, scales = blockwise(table, 8, 32)
        want = dequantize(packed, scales, 8, 64)[ids] * 8.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_packing_matches_onnxruntime(bits) -> None:
    """Our packing is what onnxruntime's kernel expects (checked at full accuracy)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n = 64, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    packed, scales = blockwise(np.ascontiguousarray(w.T), bits, 32)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=32, accuracy_level=0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")],
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = x @ dequantize(packed, scales, bits, k).T
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, atol=1e-4)


# -- the package a conversion writes ---------------------------------------------


@pytest.fixture(scope="module")
def gemma_pkg():
    return shared_tiny_package("gemma3")


def test_manifest_describes_every_layer_at_every_precision(gemma_pkg) -> None:
    m = Manifest.load(gemma_pkg)
    assert m.architecture == "Gemma3ForCausalLM" and m.num_layers == 4
    assert m.hidden_size == 64 and m.vocab_size > 300 and m.context_length == 512
    for cost in [*m.layers, m.embedding, m.head]:
        wb = cost.weight_bytes
        assert set(wb) == {"fp32", "fp16", "int8", "int4"}
        assert wb["fp32"] > wb["fp16"] > wb["int8"] >= wb["int4"] > 0
    # int4 layers keep v_proj and down_proj at 8 bits, the rest is 4-bit.
    assert all(c.weight_bytes["int8"] > c.weight_bytes["int4"] for c in m.layers)
    layer = m.layers[0]
    # q,k,v,o + gate,up,down of the tiny config: 2 * multiply-adds.
    macs = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 128
    assert layer.flops_per_token == 2 * macs
    assert layer.kv_bytes_per_token == 2 * 1 * 16 * 4
    assert layer.attn_flops_per_token_per_ctx == 4 * 4 * 16
    assert m.head.flops_per_token == 2 * 64 * m.vocab_size and m.embedding.flops_per_token == 0
    assert m.extra["layer_types"][1] == "full_attention" and m.extra["sliding_window"] == 8
    assert m.tokenizer.file == "tokenizer.json" and m.tokenizer.chat_template
    assert m.tokenizer.eos_token_ids and m.tokenizer.bos_token_id is not None


def test_every_artifact_is_listed_with_its_hash(gemma_pkg) -> None:
    m = Manifest.load(gemma_pkg)
    listed = {a.path for a in m.artifacts}
    on_disk = {
        p.relative_to(gemma_pkg).as_posix()
        for p in gemma_pkg.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert listed == on_disk
    for art in m.artifacts[:6]:
        assert sha256_file(gemma_pkg / art.path) == art.sha256
        assert (gemma_pkg / art.path).stat().st_size == art.bytes


def test_accuracy_is_measured_and_int8_is_within_ten_percent(gemma_pkg) -> None:
    m = Manifest.load(gemma_pkg)
    assert m.accuracy["fp32"] == 0.0
    assert set(m.accuracy) == {"fp32", "fp16", "int8", "int4"}
    assert abs(m.accuracy["fp16"]) < 0.01
    assert m.accuracy["int8"] < 0.10
    assert m.accuracy["int4"] is not None
    values = m.extra["perplexity"]["values"]
    assert values["fp32"] > 1 and m.extra["perplexity"]["tokens"] == 256


# -- tokenizer --------------------------------------------------------------------


def test_tokenizer_round_trips_and_streams_multibyte_text(gemma_pkg) -> None:
    tok = open_package(gemma_pkg).tokenizer()
    text = "The keeper wrote: naïve café, 東京 — ok."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text  # BOS renders as nothing
    stream = tok.stream_decoder()
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters emitted


def test_tokenizer_renders_the_chat_template(gemma_pkg) -> None:
    tok = open_package(gemma_pkg).tokenizer()
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids.count(tok.bos_id) == 1
    assert tok.render_chat([{"role": "user", "content": "Hello"}]).endswith("assistant\n")
