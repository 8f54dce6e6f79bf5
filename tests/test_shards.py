"""Layer-range shards: token-identical to transformers through any cuts.

Each supported family is built as a tiny random model, converted, and cut
into 1, 2 and 3 ranges (a first range of one layer, a last range of one
layer, uneven middles). Greedy decoding of 64 tokens through the chain
must equal ``model.generate(do_sample=False)`` token for token at fp32.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from edgemesh.backends.base import BackendOptions
from edgemesh.errors import ConfigError, CorruptArtifactError
from edgemesh.offline import generate
from edgemesh.sharding.package.folder import open_package
from edgemesh.sharding.pipeline import load_pipeline, ranges_from_cuts
from tests.fixtures.tiny_models import ARCHS, hf_model_dir, shared_tiny_package

PROMPT = "The lighthouse stood at the end of a long finger of rock"
NEW_TOKENS = 64


def _cut_sets(num_layers: int) -> list[list[int]]:
    # 1 range; 2 ranges cut right after the first layer; 2 ranges cut right
    # before the last layer (+ head); 3 uneven ranges using both cuts.
    return [[], [1], [num_layers - 1], [1, num_layers - 1]]


@cache
def _prompt_ids(arch: str) -> tuple[int, ...]:
    return tuple(open_package(shared_tiny_package(arch)).tokenizer().encode(PROMPT))


@cache
def _reference(arch: str) -> tuple[int, ...]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_model_dir(shared_tiny_package(arch))), dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens, like ignore-eos
    prompt = torch.tensor([_prompt_ids(arch)])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return tuple(out[0, prompt.shape[1] :].tolist())


def _options(tmp: Path) -> BackendOptions:
    return BackendOptions(threads=1, cache_dir=tmp / "ranges")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_token_identical_to_transformers_through_every_cut(arch, tmp_path) -> None:
    package = open_package(shared_tiny_package(arch))
    reference = list(_reference(arch))
    assert len(reference) == NEW_TOKENS
    assert len(set(reference)) > 5, "the reference degenerated into a loop; test too weak"
    for cuts in _cut_sets(package.num_layers):
        pipe = load_pipeline(package, cuts, "fp32", options=_options(tmp_path))
        try:
            got = generate(pipe, list(_prompt_ids(arch)), max_tokens=NEW_TOKENS).token_ids
        finally:
            pipe.close()
        assert got == reference, f"{arch} cut at {cuts} diverged at token " + str(
            next(i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b)
        )


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_logits_of_a_chain_match_transformers(arch, tmp_path) -> None:
    import torch
    import transformers

    package = open_package(shared_tiny_package(arch))
    ids = list(_prompt_ids(arch))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_model_dir(package.root)), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()  # [S, V]
    pipe = load_pipeline(package, [2], "fp32", options=_options(tmp_path))
    from edgemesh.backends.base import SeqInput

    got = pipe.forward([SeqInput(0, 0, tokens=np.array(ids), logits="all")])[0]
    pipe.close()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_mixed_precision_chain_runs_and_stays_close(tmp_path) -> None:
    """One package serves an fp16, an int8 and an int4 range in the same pipeline."""
    from edgemesh.backends.base import SeqInput

    package = open_package(shared_tiny_package("gemma3"))
    ids = np.array(_prompt_ids("gemma3"))

    def logits(cuts: list[int], precision) -> np.ndarray:
        pipe = load_pipeline(package, cuts, precision, options=_options(tmp_path))
        try:
            return pipe.forward([SeqInput(0, 0, tokens=ids, logits="all")])[0]  # [S, V]
        finally:
            pipe.close()

    want = logits([], "fp32")
    err = {p: np.abs(logits([], p) - want).mean() / want.std() for p in ("fp16", "int8", "int4")}
    # Each precision costs more than the one above it; fp16 is nearly free.
    assert err["fp16"] < 0.01 < err["int4"] and err["fp16"] < err["int8"] < err["int4"], err
    mixed = load_pipeline(package, [1, 3], ["fp16", "int8", "int4"], options=_options(tmp_path))
    try:
        got = mixed.forward([SeqInput(0, 0, tokens=ids, logits="all")])[0]
        gen = generate(mixed, list(ids), max_tokens=8)
    finally:
        mixed.close()
    assert [b.shard.precision for b in mixed.backends] == ["fp16", "int8", "int4"]
    assert got.shape == want.shape
    # The int4 range (the last layer and the head) is really int4, and the
    # fp16/int8 ranges are not: the chain's error lies between the extremes.
    mixed_err = np.abs(got - want).mean() / want.std()
    assert err["int8"] < mixed_err < err["int4"], (mixed_err, err)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.75
    assert len(gen.token_ids) == 8
    assert all(0 <= t < package.manifest.vocab_size for t in gen.token_ids)


def test_recut_composes_from_pieces_and_reuses_the_cache(tmp_path) -> None:
    package = open_package(shared_tiny_package("qwen3"))
    cache = tmp_path / "ranges"
    first = package.range_graph(1, 3, "int4", cache)
    assert first.is_file() and (first.parent / "range.onnx.data").is_file()
    stamp = first.stat().st_mtime_ns
    again = package.range_graph(1, 3, "int4", cache)
    assert again == first and again.stat().st_mtime_ns == stamp  # reused, not rewritten
    other = package.range_graph(0, 2, "int4", cache)
    assert other.parent != first.parent


def test_the_range_cache_drops_the_least_recently_used_entries(tmp_path) -> None:
    package = open_package(shared_tiny_package("qwen3"))
    cache = tmp_path / "ranges"
    a = package.range_graph(0, 1, "fp32", cache).parent
    b = package.range_graph(1, 2, "fp32", cache).parent
    one = sum(f.stat().st_size for f in a.iterdir())
    old = a.stat().st_mtime - 60
    os.utime(b, (old, old))  # b is now the least recently used ...
    assert package.range_graph(0, 1, "fp32", cache).parent == a  # ... and a hit marks a used
    assert a.stat().st_mtime > old + 30
    # Room for about two entries: composing a third drops b, keeps a and the new one.
    c = package.range_graph(2, 3, "fp32", cache, cache_limit_bytes=int(2.5 * one)).parent
    assert a.is_dir() and c.is_dir() and not b.exists()
    # The newest entry stays even when it alone is over the bound.
    d = package.range_graph(0, 3, "fp32", cache, cache_limit_bytes=1).parent
    assert [e.name for e in cache.iterdir() if not e.name.startswith(".")] == [d.name]
    assert package.range_graph(0, 3, "fp32", cache).is_file()


def test_ranges_from_cuts_rejects_bad_cuts() -> None:
    assert [(r.start, r.stop) for r in ranges_from_cuts([1, 3], 4)] == [(0, 1), (1, 3), (3, 4)]
    for bad in ([0], [4], [3, 1], [2, 2]):
        with pytest.raises(ConfigError):
            ranges_from_cuts(bad, 4)


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(shared_tiny_package("llama"), dst)
    return dst


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_a_damaged_artifact_is_caught_by_hash_and_named(damage, tmp_path) -> None:
    root = _copy(tmp_path)
    victim = root / "fp32" / "layer_002.onnx.data"
    if damage == "altered":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        victim.unlink()
    package = open_package(root)
    with pytest.raises(CorruptArtifactError) as err:
        load_pipeline(package, [2], "fp32", options=_options(tmp_path))
    assert "fp32/layer_002.onnx.data" in str(err.value)
    # Ranges that do not use the damaged layer still load.
    package.range_graph(0, 2, "fp32", tmp_path / "ranges")


def test_a_damaged_tokenizer_is_caught(tmp_path) -> None:
    root = _copy(tmp_path)
    (root / "tokenizer.json").write_text("{}")
    with pytest.raises(CorruptArtifactError) as err:
        open_package(root).tokenizer()
    assert "tokenizer.json" in str(err.value)


# -- the default model -------------------------------------------------------------


@pytest.fixture(scope="module")
def default_package(tmp_path_factory, default_gguf):
    """The default GGUF converted at fp32 (no perplexity pass, to keep it short)."""
    from edgemesh.sharding.convert.run import ConvertOptions, convert

    out = tmp_path_factory.mktemp("default") / "pkg"
    convert(default_gguf, out, ConvertOptions(precisions=("fp32",), evaluate=False))
    return out


@pytest.mark.slow
def test_default_model_is_token_identical_to_transformers_through_every_cut(
    default_package, default_gguf, tmp_path
) -> None:
    import torch

    package = open_package(default_package)
    n = package.num_layers
    ids = package.tokenizer().encode(PROMPT)
    from edgemesh.sharding.convert.sources import open_source

    # The reference: transformers' Gemma3ForCausalLM holding the GGUF's tensors
    # as transformers' own GGUF reader dequantises them. (from_pretrained with
    # gguf_file= would do the same but requires accelerate.)
    model = open_source(default_gguf).load_model()
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )  # fmt: skip
    reference = out[0, prompt.shape[1] :].tolist()
    del model
    assert len(set(reference)) > 5
    for cuts in [*_cut_sets(n), [6, 12]]:
        pipe = load_pipeline(package, cuts, "fp32", options=_options(tmp_path))
        try:
            got = generate(pipe, ids, max_tokens=NEW_TOKENS).token_ids
        finally:
            pipe.close()
        assert got == reference, f"default model cut at {cuts} diverged"
