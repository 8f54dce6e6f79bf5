"""Calibration: a box times the real model, and the planner prices it from the timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from edgemesh.errors import ConfigError, FingerprintError
from edgemesh.fingerprint.calibrate import (
    cache_path,
    cached_calibrations,
    calibrate,
    run_calibration,
)
from edgemesh.sharding.package.manifest import Artifact
from edgemesh.sharding.planner.boxes import BoxProfile
from edgemesh.sharding.planner.calibration import Calibration, StageTiming
from edgemesh.sharding.planner.costs import CostModel, PlanOptions
from edgemesh.sharding.planner.plan import plan
from edgemesh.sharding.planner.scenarios import synthetic_manifest
from tests.fixtures.tiny_models import shared_tiny_package

runner = CliRunner()
WINDOW_S = 0.05
"""Short timing windows keep these tests quick; the figures are still real."""


def _manifest(layers: int = 8):  # type: ignore[no-untyped-def]
    m = synthetic_manifest(
        "cal-model", num_layers=layers, hidden=512, intermediate=1536, heads=8, kv_heads=2,
        head_dim=64, vocab=32000, context=1024, accuracy={"fp32": 0.0, "int8": 0.01},
    )  # fmt: skip
    # A digest needs artifacts: two conversions of the "same" model differ by them.
    m.artifacts.append(Artifact("fp32/layer_000.onnx", "ab" * 32, 10))
    return m


def _box(box_id: str, timings: dict[str, dict] | None = None, digest: str = "",
         position: int = 256) -> dict:  # fmt: skip
    box = {
        "id": box_id,
        "memory_limit_bytes": 8_000_000_000,
        "backends": ["onnxruntime"],
        "compute": {
            "onnxruntime/fp32": {"gflops": 50, "bandwidth_gbps": 10},
            "onnxruntime/int8": {"gflops": 50, "bandwidth_gbps": 10},
        },
    }
    if timings is not None:
        box["calibration"] = [
            {"model": "cal-model", "digest": digest, "position": position, "threads": 2,
             "layers": [1, 5], "timings": timings}
        ]  # fmt: skip
    return box


TIMING = {"layer_ms": 2.0, "overhead_ms": 0.5, "embed_ms": 0.25, "head_ms": 7.0}


def test_profile_round_trip_keeps_the_calibration() -> None:
    m = _manifest()
    box = BoxProfile.from_dict(_box("a", {"onnxruntime/fp32": TIMING}, m.digest()))
    again = BoxProfile.from_dict(json.loads(json.dumps(box.to_dict())))
    assert again == box
    cal = again.calibration_for(m.digest())
    assert cal is not None and cal.timings["onnxruntime/fp32"] == StageTiming(2.0, 0.5, 0.25, 7.0)
    assert again.calibration_for("0" * 16) is None


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"onnxruntime/fp32": {**TIMING, "layer_ms": -1}}, "layer_ms must be a number >= 0"),
        ({"onnxruntime/fp32": {**TIMING, "layer_ms": 0}}, "layer_ms must be > 0"),
        ({"onnxruntime/fp99": TIMING}, "is not '<backend>/<precision>'"),
        ({"onnxruntime/fp32": {"layer_ms": 1}}, "overhead_ms must be a number"),
    ],
)
def test_bad_calibration_is_a_config_error(bad: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BoxProfile.from_dict(_box("a", bad, "d" * 16))


def test_calibration_without_digest_or_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="no 'digest'"):
        BoxProfile.from_dict(_box("a", {"onnxruntime/fp32": TIMING}, ""))
    box = _box("a", {"onnxruntime/fp32": TIMING}, "d" * 16)
    box["calibration"] = box["calibration"] * 2
    with pytest.raises(ConfigError, match="same model digest"):
        BoxProfile.from_dict(box)


def test_calibrated_stage_time_is_overhead_plus_layers_plus_ends() -> None:
    m = _manifest()
    n = m.num_layers
    # Timed at half the plan's context: every layer's roofline weight is exactly 1.
    box = _box("a", {"onnxruntime/fp32": TIMING}, m.digest(), position=512)
    model = CostModel(m, [BoxProfile.from_dict(box)], None, PlanOptions(context=1024))
    opts = {o.key: o for o in model.costs[0].options}
    cal, roof = opts["onnxruntime/fp32"], opts["onnxruntime/int8"]
    assert cal.source == "calibrated" and roof.source == "roofline"
    assert cal.time[2, 5] == pytest.approx(0.5 + 3 * 2.0)
    assert cal.time[0, 3] == pytest.approx(0.5 + 3 * 2.0 + 0.25)
    assert cal.time[4, n] == pytest.approx(0.5 + (n - 4) * 2.0 + 7.0)
    assert cal.time[0, n] == pytest.approx(0.5 + n * 2.0 + 0.25 + 7.0)
    # The uncalibrated option keeps the roofline: no fixed per-stage cost.
    layer = model.layer_ms(roof.rate, "int8")
    assert roof.time[2, 5] == pytest.approx(float(layer[2:5].sum()))


def test_longer_context_scales_calibrated_layers_like_the_roofline() -> None:
    m = _manifest()
    box = BoxProfile.from_dict(_box("a", {"onnxruntime/fp32": TIMING}, m.digest(), position=16))
    model = CostModel(m, [box], None, PlanOptions(context=1024))
    opt = next(o for o in model.costs[0].options if o.key == "onnxruntime/fp32")
    ratio = model.layer_ms(opt.rate, "fp32") / model.layer_ms(opt.rate, "fp32", 16)
    assert ratio[0] > 1  # the KV cache at position 512 is read on top of the weights
    assert opt.time[1, 2] == pytest.approx(0.5 + 2.0 * ratio[1])


def test_another_models_calibration_is_ignored() -> None:
    m = _manifest()
    box = BoxProfile.from_dict(_box("a", {"onnxruntime/fp32": TIMING}, "f" * 16))
    model = CostModel(m, [box], None, PlanOptions(context=1024))
    assert {o.source for o in model.costs[0].options} == {"roofline"}


def test_a_slow_measured_head_moves_the_last_stage() -> None:
    """Two boxes the roofline cannot tell apart; box a measured a slow LM head."""
    m = _manifest()
    fast = {"layer_ms": 2.0, "overhead_ms": 0.1, "embed_ms": 0.1, "head_ms": 1.0}
    slow = {**fast, "head_ms": 30.0}
    boxes = [_box("a", {"onnxruntime/fp32": slow}, m.digest(), 512),
             _box("b", {"onnxruntime/fp32": fast}, m.digest(), 512)]  # fmt: skip
    options = PlanOptions(context=1024, max_accuracy_loss=0.0)
    result = plan(m, boxes, None, options)
    assert result.stages[-1].box == "b"
    assert all(s.cost_source == "calibrated" for s in result.stages)
    # Swapping the timings swaps the boxes: the plan follows the measurement.
    boxes[0]["calibration"][0]["timings"]["onnxruntime/fp32"] = fast
    boxes[1]["calibration"][0]["timings"]["onnxruntime/fp32"] = slow
    assert plan(m, boxes, None, options).stages[-1].box == "a"


@pytest.fixture(scope="module")
def tiny() -> Path:
    return shared_tiny_package("llama")


def test_real_calibration_of_a_tiny_package_is_cached(tiny: Path, tmp_path: Path) -> None:
    from edgemesh.sharding.package.folder import open_package

    digest = open_package(tiny).manifest.digest()
    found = calibrate(tiny, ["onnxruntime"], 1, 2 << 30, "hw-key", tmp_path, window_s=WINDOW_S)
    assert found.digest == digest and found.threads == 1
    assert "onnxruntime/fp32" in found.timings
    assert found.layers == (1, 3)  # 4 layers: the block leaves layer 0 and the last out
    for t in found.timings.values():
        assert t.layer_ms > 0 and min(t.overhead_ms, t.embed_ms, t.head_ms) >= 0
    path = cache_path(tmp_path, "hw-key", digest, found.position, 1)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    again = calibrate(tiny, ["onnxruntime"], 1, 2 << 30, "hw-key", tmp_path, window_s=WINDOW_S)
    assert again.timings == {k: StageTiming.from_dict(k, v.to_dict())
                             for k, v in found.timings.items()}  # fmt: skip
    assert path.stat().st_mtime_ns == mtime
    # A different box (hardware key) times again, into its own file.
    calibrate(tiny, ["onnxruntime"], 1, 2 << 30, "other-hw", tmp_path, window_s=WINDOW_S)
    assert len(list(tmp_path.glob("calibrate-*.json"))) == 2
    # `--measure` picks up what this hardware and thread count calibrated, nothing else.
    assert [c.digest for c in cached_calibrations("hw-key", 1, tmp_path)] == [digest]
    assert cached_calibrations("hw-key", 2, tmp_path) == []
    assert cached_calibrations("third-hw", 1, tmp_path) == []
    # A file from an older edgemesh (another schema) is not read back.
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema": data["schema"] - 1}))
    assert cached_calibrations("hw-key", 1, tmp_path) == []


def test_calibration_times_openvino_and_skips_whole_model_backends(tiny: Path) -> None:
    pytest.importorskip("openvino")
    found = run_calibration(tiny, ["openvino", "llamacpp"], 1, 2 << 30, window_s=WINDOW_S)
    assert {k.partition("/")[0] for k in found.timings} == {"openvino"}
    assert all(t.layer_ms > 0 for t in found.timings.values())


def test_too_few_layers_to_calibrate_is_a_typed_error() -> None:
    qwen2 = shared_tiny_package("qwen2")  # 3 layers
    with pytest.raises(FingerprintError, match="at least 4"):
        run_calibration(qwen2, ["onnxruntime"], 1, 2 << 30)


def test_corrupt_calibration_cache_is_timed_again(tiny: Path, tmp_path: Path) -> None:
    from edgemesh.sharding.package.folder import open_package

    digest = open_package(tiny).manifest.digest()
    path = cache_path(tmp_path, "hw", digest, 32, 1)
    path.write_text("{not json")
    found = calibrate(tiny, ["onnxruntime"], 1, 2 << 30, "hw", tmp_path, 32, WINDOW_S)
    assert found.timings and Calibration.from_dict("x", json.loads(path.read_text())).timings


@pytest.mark.slow
def test_plan_calibrate_prices_this_box_from_its_timings(tiny: Path, tmp_path: Path) -> None:
    env = {"EDGEMESH_CACHE_DIR": str(tmp_path)}
    result = runner.invoke(app, ["plan", "--model", str(tiny), "--calibrate", "--json"], env=env)
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [s["cost_source"] for s in stages] == ["calibrated"]
    info = runner.invoke(app, ["info", "--json", "--measure", "--calibrate", str(tiny)], env=env)
    cal = json.loads(info.stdout)["profile"]["calibration"]
    assert [c["model"] for c in cal] and np.isfinite(stages[0]["predicted_ms"])
    # --calibrate with --boxes is refused with what to do instead.
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([_box("a")]))
    bad = runner.invoke(app, ["plan", "--model", str(tiny), "--boxes", str(boxes), "--calibrate"])
    assert bad.exit_code != 0 and "calibrate each box" in bad.output
