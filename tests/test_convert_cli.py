"""`edgemesh convert` then `edgemesh generate --json`, as a user runs them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.fixtures.tiny_models import build_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    from edgemesh.cli import app

    return app


@pytest.fixture(scope="module")
def converted(tmp_path_factory, app):
    root = tmp_path_factory.mktemp("cli")
    src = build_tiny_model("qwen2", root / "hf")
    out = root / "pkg"
    result = runner.invoke(
        app,
        ["convert", str(src), "--out", str(out), "--precisions", "fp32,int8",
         "--eval-tokens", "128", "--threads", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout)


def test_convert_prints_a_summary_and_writes_a_package(converted) -> None:
    root, summary = converted
    assert summary["architecture"] == "Qwen2ForCausalLM" and summary["layers"] == 3
    assert summary["precisions"] == ["fp32", "int8"]
    assert set(summary["perplexity"]) == {"fp32", "int8"}
    assert (root / "pkg" / "manifest.json").is_file()
    assert (root / "pkg" / "int8" / "layer_002.onnx").is_file()


def test_generate_json_matches_the_python_api(converted, app) -> None:
    from edgemesh.backends.base import BackendOptions
    from edgemesh.offline import generate
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    root, _ = converted
    pkg = root / "pkg"
    args = ["generate", str(pkg), "--prompt", "The night train left", "--max-tokens", "12",
            "--cuts", "1,2", "--ignore-eos", "--cache-dir", str(root / "cache"),
            "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 12
    assert out["ranges"] == [[0, 1], [1, 2], [2, 3]]
    package = open_package(pkg)
    tok = package.tokenizer()
    assert out["text"] == tok.decode(out["token_ids"])
    pipe = load_pipeline(package, [], "fp32", options=BackendOptions(cache_dir=root / "cache"))
    want = generate(pipe, tok.encode("The night train left"), max_tokens=12).token_ids
    pipe.close()
    assert out["token_ids"] == want
    # Sampling with a seed is reproducible, and differs from greedy somewhere.
    sampled = [
        json.loads(runner.invoke(app, [*args, "--temperature", "1.5", "--seed", "7"]).stdout)
        for _ in range(2)
    ]
    assert sampled[0]["token_ids"] == sampled[1]["token_ids"]
    assert sampled[0]["token_ids"] != out["token_ids"]


def test_generate_mixed_precisions_per_range(converted, app) -> None:
    root, _ = converted
    result = runner.invoke(
        app,
        ["generate", str(root / "pkg"), "--prompt", "Bread is", "--max-tokens", "4",
         "--cuts", "2", "--precision", "fp32,int8", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == ["fp32", "int8"]


def test_cli_errors_are_one_line_and_name_the_problem(converted, app, tmp_path) -> None:
    root, _ = converted
    missing = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code == 1 and "no model package" in missing.output
    bad_prec = runner.invoke(
        app, ["generate", str(root / "pkg"), "--prompt", "x", "--precision", "int4"]
    )
    assert bad_prec.exit_code == 1 and "no int4 graphs" in bad_prec.output
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    )
    refused = runner.invoke(app, ["convert", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert refused.exit_code == 1 and "MambaForCausalLM" in refused.output
    busy = runner.invoke(app, ["convert", str(root / "hf"), "--out", str(root / "pkg")])
    assert busy.exit_code == 1 and "not empty" in busy.output


def _boxes_splitting(manifest, path) -> None:
    """Two onnxruntime boxes, each with room for ~60% of the model at fp32."""
    from edgemesh.sharding.planner.costs import RUNTIME_OVERHEAD_BYTES, PlanOptions

    context = PlanOptions().context_for(manifest)
    weights = sum(c.weight_bytes["fp32"] for c in manifest.layers)
    weights += manifest.embedding.weight_bytes["fp32"] + manifest.head.weight_bytes["fp32"]
    kv = sum(c.kv_bytes_per_token for c in manifest.layers) * context * PlanOptions().sequences
    limit = int((RUNTIME_OVERHEAD_BYTES + 0.6 * (weights + kv)) / (1 - PlanOptions().headroom))
    rate = {"gflops": 20, "bandwidth_gbps": 5}
    boxes = [
        {"id": name, "memory_limit_bytes": limit, "backends": ["onnxruntime"],
         "compute": {f"onnxruntime/{p}": rate for p in ("fp32", "int8")}}
        for name in ("a", "b")
    ]  # fmt: skip
    path.write_text(json.dumps({"boxes": boxes}))


def test_plan_from_a_converted_package_then_generate_through_its_cuts(converted, app) -> None:
    """The planner reads the manifest convert wrote, and its cuts run."""
    from edgemesh.sharding.package.manifest import Manifest

    root, _ = converted
    manifest = Manifest.load(root / "pkg")
    boxes = root / "boxes.json"
    _boxes_splitting(manifest, boxes)
    result = runner.invoke(
        app, ["plan", "--model", str(root / "pkg"), "--boxes", str(boxes), "--json"]
    )
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert len(stages) == 2, "the model fits no single box, so the plan must split it"
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == manifest.num_layers
    assert stages[0]["layers"][1] == stages[1]["layers"][0]
    for stage in stages:
        start, stop = stage["layers"]
        p = stage["precision"]
        want = sum(c.weight_bytes[p] for c in manifest.layers[start:stop])
        want += manifest.embedding.weight_bytes[p] if start == 0 else 0
        want += manifest.head.weight_bytes[p] if stop == manifest.num_layers else 0
        assert stage["weight_bytes"] == want
    cut = str(stages[0]["layers"][1])
    precisions = ",".join(s["precision"] for s in stages)
    gen = runner.invoke(
        app,
        ["generate", str(root / "pkg"), "--prompt", "Bread is", "--max-tokens", "3",
         "--cuts", cut, "--precision", precisions, "--cache-dir", str(root / "cache"), "--json"],
    )  # fmt: skip
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["ranges"] == [s["layers"] for s in stages]


def test_plan_respects_the_measured_accuracy_of_the_package(converted, app) -> None:
    from edgemesh.sharding.package.manifest import Manifest

    root, _ = converted
    loss = Manifest.load(root / "pkg").accuracy["int8"]
    assert loss is not None
    box = {"id": "only-int8", "memory_limit_bytes": 8 * 10**9, "backends": ["onnxruntime"],
           "compute": {"onnxruntime/int8": {"gflops": 20, "bandwidth_gbps": 5}}}  # fmt: skip
    path = root / "int8_box.json"
    path.write_text(json.dumps([box]))
    args = ["plan", "--model", str(root / "pkg"), "--boxes", str(path), "--json"]
    allowed = runner.invoke(app, [*args, "--max-accuracy-loss", str(abs(loss) + 0.01)])
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["stages"][0]["precision"] == "int8"
    if loss > 0:
        refused = runner.invoke(app, [*args, "--max-accuracy-loss", str(loss / 2)])
        assert refused.exit_code == 1 and "int8" in refused.output
