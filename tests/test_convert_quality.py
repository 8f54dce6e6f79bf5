"""`edgemesh convert`'s quality step never costs a good export (issue 13, part 1).

A model whose context (512) is shorter than the bundled text is measured in
windows of its context; a tokenizer that maps the text to fewer than two
tokens still yields a package, marked "accuracy not measured", for which the
planner allows only fp32/fp16 unless the budget is unbounded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.tiny_models import build_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    from edgemesh.cli import app

    return app


@pytest.fixture(scope="module")
def ctx512(tmp_path_factory, app) -> tuple[Path, dict]:
    """A tiny Qwen2 (max_position_embeddings=512) converted with default flags."""
    root = tmp_path_factory.mktemp("ctx512")
    src = build_tiny_model("qwen2", root / "hf")
    assert json.loads((src / "config.json").read_text())["max_position_embeddings"] == 512
    result = runner.invoke(app, ["convert", str(src), "--out", str(root / "pkg"), "--json"])
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_a_context_512_model_converts_with_defaults_and_is_measured_in_windows(ctx512) -> None:
    from edgemesh.sharding.package.manifest import Manifest

    root, summary = ctx512
    manifest = Manifest.load(root / "pkg")
    ppl = manifest.extra["perplexity"]
    assert manifest.context_length == 512
    assert ppl["measured"] and ppl["reason"] is None
    assert ppl["tokens"] > 512  # the whole text, longer than the context
    assert (ppl["window"], ppl["stride"]) == (512, 256)
    assert set(ppl["values"]) == {"fp32", "fp16", "int8", "int4"}
    assert all(manifest.accuracy[p] is not None for p in ("fp16", "int8", "int4"))
    assert summary["accuracy_note"] is None
    # A random tiny model over a 384-token vocabulary: worse than a good LM,
    # far better than nothing would make it look (inf/nan).
    assert all(1.0 < v < 10_000 for v in ppl["values"].values())


def test_windowed_perplexity_matches_transformers_on_the_same_windows(ctx512) -> None:
    """Each token scored once, given the window's prefix, as torch computes it."""
    import torch
    import transformers

    from edgemesh.backends.base import BackendOptions
    from edgemesh.offline import perplexity_windows
    from edgemesh.sharding.convert.run import eval_text
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    root, _ = ctx512
    pkg = open_package(root / "pkg")
    ids = pkg.tokenizer().encode(eval_text())[:700]
    pipe = load_pipeline(pkg, [1], "fp32", options=BackendOptions(cache_dir=root / "cache"))
    try:
        got = perplexity_windows(pipe, ids, window=300)
        whole = perplexity_windows(pipe, ids[:300])
    finally:
        pipe.close()
    assert (got.tokens, got.scored, got.window, got.stride) == (700, 699, 300, 150)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf")).eval()
    nll, count, done, begin = 0.0, 0, 1, 0
    with torch.no_grad():
        while done < len(ids):
            end = min(begin + 300, len(ids))
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()  # [n, V]
            logp = torch.log_softmax(logits, -1)
            for j in range(done, end):  # target j, predicted by row j - begin - 1
                nll -= float(logp[j - begin - 1, ids[j]])
                count += 1
            done, begin = end, begin + 150
    assert count == 699
    assert got.value == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert (whole.window, whole.stride, whole.scored) == (300, 300, 299)


def test_perplexity_refuses_what_it_cannot_score(ctx512) -> None:
    from edgemesh.errors import ConfigError
    from edgemesh.offline import perplexity_windows

    with pytest.raises(ConfigError, match="at least two tokens, got 1"):
        perplexity_windows(None, [5])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="window needs at least two"):
        perplexity_windows(None, [5, 6, 7], window=1)  # type: ignore[arg-type]


def _cjk_only_tokenizer(hf: Path) -> None:
    """Replace the checkpoint's tokenizer with one that knows two CJK
    characters and nothing else: English text maps to the BOS token alone."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "水": 3, "火": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no unk: unknown text is dropped
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf / name).unlink(missing_ok=True)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(hf)


@pytest.fixture(scope="module")
def unmeasured(tmp_path_factory, app) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("unmeasured")
    src = build_tiny_model("llama", root / "hf")
    _cjk_only_tokenizer(src)
    result = runner.invoke(app, ["convert", str(src), "--out", str(root / "pkg")])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_a_tokenizer_that_cannot_represent_the_text_still_yields_a_package(unmeasured) -> None:
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.package.manifest import Manifest

    root, output = unmeasured
    manifest = Manifest.load(root / "pkg")
    assert open_package(root / "pkg").tokenizer().encode("The lighthouse stood") == [1]
    ppl = manifest.extra["perplexity"]
    assert not ppl["measured"] and ppl["values"] == {}
    assert "1 token(s)" in ppl["reason"]
    assert manifest.accuracy == {"fp32": 0.0, "fp16": None, "int8": None, "int4": None}
    # The CLI says what the planner will then do.
    assert "accuracy not measured for int8, int4" in output
    assert "the planner uses only fp32/fp16" in output
    assert "--max-accuracy-loss inf" in output
    assert (root / "pkg" / "int4" / "layer_003.onnx").is_file()  # the export is all there


def test_the_planner_allows_only_fp32_fp16_for_it_unless_the_budget_is_unbounded(
    unmeasured, app
) -> None:
    root, _ = unmeasured
    # int4 and int8 are much faster on this box: only the accuracy rule keeps them out.
    compute = {
        "onnxruntime/fp32": {"gflops": 5, "bandwidth_gbps": 1},
        "onnxruntime/fp16": {"gflops": 5, "bandwidth_gbps": 1},
        "onnxruntime/int8": {"gflops": 50, "bandwidth_gbps": 10},
        "onnxruntime/int4": {"gflops": 100, "bandwidth_gbps": 20},
    }
    box = {"id": "b", "memory_limit_bytes": 8 * 10**9, "backends": ["onnxruntime"],
           "compute": compute}  # fmt: skip
    boxes = root / "boxes.json"
    boxes.write_text(json.dumps([box]))
    args = ["plan", "--model", str(root / "pkg"), "--boxes", str(boxes), "--json"]

    default = runner.invoke(app, args)
    assert default.exit_code == 0, default.output
    plan = json.loads(default.stdout)
    assert {s["precision"] for s in plan["stages"]} <= {"fp32", "fp16"}
    assert "accuracy not measured for int8, int4" in default.stderr

    unbounded = runner.invoke(app, [*args, "--max-accuracy-loss", "inf"])
    assert unbounded.exit_code == 0, unbounded.output
    assert {s["precision"] for s in json.loads(unbounded.stdout)["stages"]} & {"int8", "int4"}
    assert "not measured" not in unbounded.stderr

    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.costs import precision_refusal

    manifest = Manifest.load(root / "pkg")
    assert "accuracy not measured" in (precision_refusal(manifest, "int8", 10.0) or "")
    assert precision_refusal(manifest, "fp16", 0.0) is None
    assert precision_refusal(manifest, "int4", float("inf")) is None
