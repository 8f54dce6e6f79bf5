"""`edgemesh slim` on tiny checkpoints built here: every method writes a package
that `generate` runs and the planner plans; bad input fails before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.tiny_models import build_tiny_model, shared_tiny_package

runner = CliRunner()
ARCH = "gemma3"  # sliding and full attention layers, tied head, sandwich norms


@pytest.fixture(scope="module")
def app():
    from edgemesh.cli import app

    return app


@pytest.fixture(scope="module")
def source() -> Path:
    return shared_tiny_package(ARCH)


@pytest.fixture(autouse=True)
def _measure_cache(tmp_path, monkeypatch):
    # measurements are cached per package digest; keep the tests' apart
    monkeypatch.setenv("EDGEMESH_CACHE_DIR", str(tmp_path / "emcache"))


def _slim(app, *args: str) -> dict:
    result = runner.invoke(app, ["slim", *args, "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _generate(app, pkg: Path, cache: Path, *extra: str) -> list[int]:
    result = runner.invoke(
        app,
        ["generate", str(pkg), "--prompt", "The keeper wrote", "--max-tokens", "12",
         "--ignore-eos", "--cache-dir", str(cache), "--json", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["token_ids"]


def _plans(app, pkg: Path, tmp: Path) -> dict:
    box = {"id": "box", "memory_limit_bytes": 8 * 10**9, "backends": ["onnxruntime"],
           "compute": {f"onnxruntime/{p}": {"gflops": 20, "bandwidth_gbps": 5}
                       for p in ("fp32", "fp16", "int8", "int4")}}  # fmt: skip
    boxes = tmp / "boxes.json"
    boxes.write_text(json.dumps([box]))
    result = runner.invoke(
        app, ["plan", "--model", str(pkg), "--boxes", str(boxes), "--max-accuracy-loss", "100",
              "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.startswith(".slim-")]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_activation_aware_int4_writes_a_package_generate_and_plan_use(
    app, source, tmp_path, method
) -> None:
    from edgemesh.sharding.package.folder import open_package

    out = tmp_path / method
    record = _slim(app, str(source), "--method", method, "--bits", "4", "--out", str(out),
                   "--no-score")  # fmt: skip
    pkg = open_package(out)
    slim = pkg.manifest.extra["slim"]
    assert slim["method"] == method and slim["params"]["bits"] == 4
    assert slim["calibration"]["source"] == "bundled:calibration"
    assert len(slim["calibration"]["sha256_16"]) == 16
    assert pkg.manifest.accuracy["int4"] == record["loss_vs_fp32"]["int4"]
    assert slim["quality"]["int4"]["perplexity"] > 1
    src = open_package(source)
    # same layout as the package's own int4: MatMulNBits at 4 and 8 bits, same size class
    for mine, theirs in zip(pkg.manifest.layers, src.manifest.layers, strict=True):
        assert (
            abs(mine.weight_bytes["int4"] - theirs.weight_bytes["int4"])
            < 0.1 * theirs.weight_bytes["int4"]
        )
        assert mine.weight_bytes["fp32"] == theirs.weight_bytes["fp32"]
    pkg.verify([a.path for a in pkg.manifest.artifacts])
    tokens = _generate(app, out, tmp_path / "cache", "--precision", "int4", "--cuts", "2")
    assert len(tokens) == 12
    plan = _plans(app, out, tmp_path)
    assert plan["stages"] and plan["stages"][-1]["layers"][1] == pkg.num_layers
    _no_leftovers(tmp_path)


def test_prune_ratio_zero_is_token_identical_to_the_source(app, source, tmp_path) -> None:
    out = tmp_path / "p0"
    _slim(app, str(source), "--method", "prune-ffn", "--ratio", "0", "--out", str(out),
          "--precisions", "fp32", "--no-score")  # fmt: skip
    cache = tmp_path / "cache"
    assert _generate(app, out, cache) == _generate(app, source, cache)


def test_prune_ffn_with_recovery_keeps_shapes_consistent_across_shards(
    app, source, tmp_path
) -> None:
    import onnx

    from edgemesh.sharding.package.folder import open_package, piece_path

    out, hf = tmp_path / "p50", tmp_path / "p50-hf"
    record = _slim(app, str(source), "--method", "prune-ffn", "--ratio", "0.5",
                   "--recover-steps", "3", "--out", str(out), "--precisions", "fp32,int4",
                   "--save-hf", str(hf), "--no-score")  # fmt: skip
    pkg = open_package(out)
    keep = pkg.manifest.extra["slim"]["params"]["kept_channels"]
    assert keep == 64 and pkg.manifest.extra["intermediate_size"] == 64
    assert json.loads((hf / "config.json").read_text())["intermediate_size"] == 64
    assert record["params"]["recover_steps"] == 3 and len(record["params"]["recovery_loss"]) == 2
    hidden = pkg.manifest.hidden_size
    for i in range(pkg.num_layers):
        model = onnx.load(str(pkg.root / piece_path("layer", "fp32", i)), load_external_data=False)
        dims = {init.name: list(init.dims) for init in model.graph.initializer}
        shapes = {
            proj: dims[node.input[1]]
            for node in model.graph.node
            for proj in ("gate_proj", "up_proj", "down_proj")
            if node.op_type == "MatMul" and f"mlp/{proj}" in node.name
        }
        assert shapes == {"gate_proj": [hidden, 64], "up_proj": [hidden, 64],
                          "down_proj": [64, hidden]}, f"layer {i}: {shapes}"  # fmt: skip
    src = open_package(source)
    assert pkg.manifest.layers[0].flops_per_token < src.manifest.layers[0].flops_per_token
    cache = tmp_path / "cache"
    whole = _generate(app, out, cache)
    assert _generate(app, out, cache, "--cuts", "1,3") == whole
    assert _generate(app, out, cache, "--cuts", "2", "--precision", "fp32,int4")
    _plans(app, out, tmp_path)


def test_prune_depth_drops_the_least_influential_layer(app, source, tmp_path) -> None:
    from edgemesh.sharding.package.folder import open_package

    out = tmp_path / "d1"
    record = _slim(app, str(source), "--method", "prune-depth", "--layers", "1", "--out",
                   str(out), "--precisions", "fp32", "--no-score")  # fmt: skip
    pkg, src = open_package(out), open_package(source)
    removed = record["params"]["removed"]
    influence = record["params"]["influence"]
    assert len(removed) == 1 and influence[removed[0]] == min(influence)
    assert pkg.num_layers == src.num_layers - 1
    types = src.layer_types()
    assert pkg.layer_types() == [t for i, t in enumerate(types) if i not in removed]
    assert len(_generate(app, out, tmp_path / "cache", "--cuts", "1")) == 12
    _plans(app, out, tmp_path)


def _student(tmp: Path, layers: int) -> Path:
    """A smaller model on the teacher's tokenizer: the tiny family with fewer layers."""
    import transformers

    folder = build_tiny_model(ARCH, tmp / "student", seed=5)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    config["layer_types"] = config["layer_types"][:layers]
    cfg = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    return folder


def test_distillation_lowers_the_students_heldout_kl_and_resumes(app, source, tmp_path) -> None:
    from edgemesh.sharding.package.folder import open_package

    student = _student(tmp_path, 2)
    out = tmp_path / "distilled"
    args = ["distill", "--teacher", str(source), "--student", str(student), "--out", str(out),
            "--no-score"]  # fmt: skip
    first = _slim(app, *args, "--steps", "6")
    kl = first["params"]["heldout_kl"]
    assert kl["after"] < kl["before"], kl
    log = out.with_name(out.name + ".train") / "loss.jsonl"
    assert len(log.read_text().splitlines()) == 6
    more = _slim(app, *args, "--steps", "10", "--overwrite", "--lr", "1e-4")
    assert len(log.read_text().splitlines()) == 10, "resumed at step 6, not from scratch"
    assert more["params"]["heldout_kl"]["after"] <= kl["after"] + 1e-3
    pkg = open_package(out)
    assert pkg.num_layers == 2 and pkg.manifest.extra["slim"]["method"] == "distill"
    assert pkg.manifest.extra["slim"]["params"]["size_vs_teacher_fp32"] < 1
    assert len(_generate(app, out, tmp_path / "cache")) == 12


def test_bad_input_is_refused_before_any_work(app, source, tmp_path) -> None:
    out = tmp_path / "never"
    cases = [
        (["--method", "prune-ffn", "--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["--method", "prune-ffn", "--ratio", "-0.1"], "--ratio must be in (0, 1)"),
        (["--method", "prune-ffn", "--ratio", "0.999"], "would leave 0 of 128 FFN channels"),
        (["--method", "prune-depth", "--layers", "4"], "must leave at least one"),
        (["--method", "awq", "--bits", "3"], "only 4"),
        (["--method", "sparsegpt"], "unknown --method"),
    ]
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    cases.append((["--method", "gptq", "--calibration", str(short)], "gptq needs at least 256"))
    from edgemesh.sharding.slim.text import heldout_text

    leaky = tmp_path / "leaky.txt"
    leaky.write_text(heldout_text())
    cases.append((["--method", "awq", "--calibration", str(leaky)], "contains the held-out"))
    for args, message in cases:
        result = runner.invoke(app, ["slim", str(source), *args, "--out", str(out)])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_a_student_with_another_tokenizer_is_refused(app, source, tmp_path) -> None:
    student = _student(tmp_path, 2)
    spec = json.loads((student / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[20:22]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "never"
    result = runner.invoke(
        app, ["slim", "distill", "--teacher", str(source), "--student", str(student),
              "--steps", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1 and "different tokenizer" in result.output, result.output
    assert not out.exists() and not out.with_name("never.train").exists()


def test_report_prints_one_row_per_package(app, source, tmp_path) -> None:
    out = tmp_path / "rtn"
    record = _slim(app, str(source), "--method", "rtn", "--out", str(out))
    score = record["quality"]["int4"]["score"]  # the lm-eval task ran on the package
    assert score["docs"] == 33 and 0 <= score["acc_norm"] <= 1
    result = runner.invoke(app, ["slim", "report", str(out), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["acc_norm"] == score["acc_norm"]
    assert row["method"] == "rtn" and row["precision"] == "int4"
    assert 0 < row["size_vs_fp32"] < 1
    assert row["loss_vs_fp32"] == pytest.approx(
        row["perplexity"] / json.loads((out / "manifest.json").read_text())["extra"]["slim"][
            "quality"]["reference"]["perplexity"] - 1, abs=1e-5)  # fmt: skip
    table = runner.invoke(app, ["slim", "report", str(out)])
    assert table.exit_code == 0 and "| rtn | int4 |" in table.stdout
    shutil.rmtree(out)


def test_the_bundled_text_splits_into_disjoint_calibration_and_heldout_parts() -> None:
    from edgemesh.sharding.convert.run import eval_text
    from edgemesh.sharding.slim.text import HELDOUT_FROM, calibration_text, heldout_text

    calib, held = calibration_text(), heldout_text()
    assert held.startswith(HELDOUT_FROM) and HELDOUT_FROM not in calib
    assert calib.strip() + "\n\n" + held.strip() == eval_text().strip()
    assert not set(calib.split("\n\n")) & set(held.split("\n\n"))
