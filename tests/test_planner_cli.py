"""`edgemesh plan` as a user runs it: a table, JSON, and exit 1 with the numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from edgemesh.sharding.planner.scenarios import SCENARIOS, gemma_270m_like, llm_7b_like

runner = CliRunner()
BOX_FILES = Path(__file__).resolve().parent / "data" / "boxes"


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Model package folders holding only a manifest.json, as the planner needs."""
    out = {}
    for manifest in (gemma_270m_like(), llm_7b_like()):
        folder = tmp_path / manifest.name
        folder.mkdir()
        manifest.save(folder)
        out[manifest.name] = folder
    return out


def run(*args: str):
    return runner.invoke(app, ["plan", *args])


def test_json_output_has_the_documented_keys(models) -> None:
    result = run(
        "--model", str(models["7b-like"]), "--boxes", str(BOX_FILES / "pi5_orin_nuc.json"), "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    stages = data["stages"]
    assert [s["box"] for s in stages] == ["pi5", "orin", "nuc"]
    assert [s["layers"] for s in stages] == [[0, 2], [2, 22], [22, 32]]
    for s in stages:
        assert {"box", "layers", "backend", "precision", "predicted_ms"} <= set(s)
    assert data["bottleneck_ms"] == max(s["predicted_ms"] for s in stages)
    assert data["predicted_tokens_per_s"] == pytest.approx(1000 / data["bottleneck_ms"])
    for name in ("memory_proportional", "equal"):
        assert data["baselines"][name]["bottleneck_ms"] > data["bottleneck_ms"]
        assert data["baselines"][name]["plan_speedup"] > 2


def test_table_output_names_every_stage_and_the_baselines(models) -> None:
    result = run(
        "--model",
        str(models["gemma-3-270m-like"]),
        "--boxes",
        str(BOX_FILES / "small_model_pi5_nuc.json"),
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "plan for 'gemma-3-270m-like' (18 layers), objective throughput" in out
    assert re.search(r"^pi5\s+\[0, 6\)\s+onnxruntime\s+int4\s", out, re.M)
    assert re.search(r"^nuc\s+\[6, 18\)\s+openvino\s+int4\s", out, re.M)
    assert "tokens/s" in out and "baseline memory_proportional:" in out and "× faster" in out


def test_a_model_that_fits_nowhere_exits_1_with_the_shortfall(models) -> None:
    result = run(
        "--model", str(models["7b-like"]), "--boxes", str(BOX_FILES / "fits_nowhere.json"), "--json"
    )
    assert result.exit_code == 1
    assert "does not fit" in result.output and "short by 4.63 GB" in result.output
    assert result.stdout == ""  # no half-written JSON on stdout


def test_options_reach_the_planner(models) -> None:
    args = [
        "--model",
        str(models["7b-like"]),
        "--boxes",
        str(BOX_FILES / "pi5_orin_nuc.json"),
        "--json",
    ]
    base = json.loads(run(*args).stdout)
    lat = json.loads(run(*args, "--objective", "latency").stdout)
    assert lat["objective"] == "latency" and lat["latency_ms"] < base["latency_ms"]
    small = json.loads(run(*args, "--context", "512", "--sequences", "1").stdout)
    assert (small["context"], small["sequences"]) == (512, 1)
    assert small["bottleneck_ms"] < base["bottleneck_ms"]
    strict = json.loads(run(*args, "--max-accuracy-loss", "0.01").stdout)
    assert "int4" not in {s["precision"] for s in strict["stages"]}
    assert strict["options"]["whole_model_only"] == ["llamacpp"]  # from the backend registry


def test_bad_input_is_a_one_line_error(models, tmp_path) -> None:
    boxes = str(BOX_FILES / "pi5_orin_nuc.json")
    result = run("--model", str(models["7b-like"]), "--boxes", boxes, "--objective", "fastest")
    assert result.exit_code == 1 and "unknown objective 'fastest'" in result.output
    result = run("--model", str(tmp_path), "--boxes", boxes)
    assert result.exit_code == 1 and "no manifest.json" in result.output
    result = run("--model", str(models["7b-like"]), "--boxes", str(tmp_path / "none.json"))
    assert result.exit_code == 1 and "no boxes file" in result.output


def test_info_style_boxes_and_links_file(models, tmp_path) -> None:
    """Boxes as `edgemesh info --json --measure` prints them: a `profile` key inside."""
    hand = SCENARIOS["pi5_orin_nuc"].boxes
    wrapped = [{"id": b["id"], "hostname": b["id"], "profile": b} for b in hand]
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"boxes": wrapped, "links": SCENARIOS["pi5_orin_nuc"].links}))
    result = run("--model", str(models["7b-like"]), "--boxes", str(path), "--json")
    assert result.exit_code == 0, result.output
    direct = run(
        "--model", str(models["7b-like"]), "--boxes", str(BOX_FILES / "pi5_orin_nuc.json"), "--json"
    )
    assert json.loads(result.stdout)["stages"] == json.loads(direct.stdout)["stages"]


def test_without_boxes_it_plans_for_this_box(models, monkeypatch) -> None:
    import edgemesh.fingerprint

    measured = []

    class FakeFingerprint:
        def to_dict(self) -> dict:
            profile = dict(SCENARIOS["small_model_pi5_nuc"].boxes[1], id="here")
            return {"id": "here", "profile": profile}

    def collect(measure: bool = False, calibrate: list | None = None) -> FakeFingerprint:
        measured.append(measure)
        assert calibrate is None  # only `--calibrate` times the model
        return FakeFingerprint()

    monkeypatch.setattr(edgemesh.fingerprint, "collect", collect, raising=False)
    result = run("--model", str(models["gemma-3-270m-like"]), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert measured == [True]
    assert [(s["box"], s["layers"]) for s in data["stages"]] == [("here", [0, 18])]
