"""`edgemesh import`: real PyTorch/ONNX models -> graph packages, accuracy measured
against the source framework, and typed errors for bad models and samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="graph import tests need torch (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="graph import tests need onnxruntime (edgemesh[onnx])")

from typer.testing import CliRunner

from edgemesh.cli import app
from edgemesh.errors import (
    CalibrationError,
    ConversionMismatchError,
    CorruptArtifactError,
    UnsupportedOpError,
)
from edgemesh.graph.build import BuildOptions, build_package
from edgemesh.graph.manifest import GraphManifest, sha256_file

CLASSIFIER = "tests.graph_models:classifier"


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 32x32 PNG frames plus one .npy batch of four."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(3)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    np.save(folder / "batch.npy", rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "cls"
    result = CliRunner().invoke(
        app, ["import", CLASSIFIER, "--out", str(out), "--calibration", str(calib_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "int8  static-qdq" in result.output
    return out


def test_package_manifest_is_complete_and_measured(package: Path) -> None:
    m = GraphManifest.load(package)
    assert m.source.framework == "pytorch" and m.source.form == "factory"
    assert m.source.version and m.opset >= 17
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("input", "FP32", (-1, 3, 32, 32))]
    assert m.inputs[0].dynamic_axes == {"0": "batch"}
    assert m.outputs[0].shape == (-1, 10) and m.task == "classifier"
    assert set(m.precisions) == {"fp32", "fp16", "int8"}
    assert m.precisions["int8"].method == "static-qdq"
    for p, entry in m.precisions.items():
        acc = entry.accuracy
        assert acc is not None and acc.samples == 12 and acc.sample_source == "calibration"
        assert acc.top1_agreement is not None and 0 <= acc.loss <= 1, p
    assert m.precisions["fp32"].accuracy.max_rel < 1e-4
    assert m.precisions["fp16"].accuracy.max_abs > 0  # really cast, not a copy
    # sha256 of every file, and the int8 graph really is QDQ.
    assert set(m.files) == {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx", "eval.npz"}
    for rel, digest in m.files.items():
        assert sha256_file(package / rel) == digest
    import onnx

    ops = {n.op_type for n in onnx.load(str(package / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert json.loads((package / "graph.json").read_text())["format"] == "edgemesh-graph/1"


def test_fp32_graph_matches_eager_pytorch_on_new_inputs(package: Path) -> None:
    import onnxruntime as ort
    import torch

    from tests.graph_models import classifier

    model, _ = classifier()
    x = np.random.default_rng(9).standard_normal((5, 3, 32, 32)).astype(np.float32)
    want = model(torch.from_numpy(x)).detach().numpy()
    sess = ort.InferenceSession(
        str(package / "model.fp32.onnx"), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {"input": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_two_outputs_and_dynamic_int8(tmp_path: Path) -> None:
    m = build_package("tests.graph_models:two_heads", tmp_path / "det")
    assert [o.name for o in m.outputs] == ["output_0", "output_1"]
    assert m.task == "generic"
    assert m.precisions["int8"].method == "dynamic"  # no calibration folder
    acc = m.precisions["int8"].accuracy
    assert acc.sample_source == "synthetic" and acc.top1_agreement is None
    assert acc.loss == acc.rel_l2


def test_onnx_file_import_keeps_the_graph(package: Path, tmp_path: Path) -> None:
    m = build_package(str(package / "model.fp32.onnx"), tmp_path / "again")
    assert m.source.framework == "onnx"
    assert m.precisions["fp32"].accuracy.max_abs == 0.0  # the reference is the file itself


def test_fp32_disagreement_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionMismatchError, match="disagrees with pytorch"):
        build_package("tests.graph_models:sign_branch", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".import-*"))


def test_corrupt_and_truncated_models(package: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    data = (package / "model.fp32.onnx").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        build_package(str(truncated), tmp_path / "x")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip archive at all")
    with pytest.raises(CorruptArtifactError, match=r"torch\.export\.load"):
        build_package(str(junk), tmp_path / "y")
    runner = CliRunner().invoke(app, ["import", str(truncated), "--out", str(tmp_path / "z")])
    assert runner.exit_code == 1 and "is corrupt" in runner.output


def test_unsupported_operator_is_named_with_its_opset(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FancyWarp", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOpError, match=r"'FancyWarp' \(opset 17\)") as info:
        build_package(str(path), tmp_path / "out")
    assert info.value.op == "FancyWarp" and info.value.opset == 17


def test_calibration_folder_of_the_wrong_shape(tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"shape \[1, 3, 16, 16\]"):
        build_package(CLASSIFIER, tmp_path / "o", BuildOptions(calibration=folder))
    (folder / "a.npy").unlink()
    np.save(folder / "b.npy", np.zeros((7,), np.float32))
    with pytest.raises(CalibrationError, match=r"array of shape \[7\]"):
        build_package(CLASSIFIER, tmp_path / "o", BuildOptions(calibration=folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        build_package(CLASSIFIER, tmp_path / "o", BuildOptions(calibration=empty))


def test_tampered_package_is_refused_at_load(package: Path, tmp_path: Path) -> None:
    import shutil

    from edgemesh.graph.service import GraphServeOptions, load_graph_service

    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    with open(copy / "model.fp32.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CorruptArtifactError, match="sha256"):
        load_graph_service(copy, GraphServeOptions(backend="onnxruntime", precision="fp32"))


def test_import_leaves_the_working_folder_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The detector is a graph on which onnxruntime's symbolic shape inference gives
    # up and dumps a debug model into the working folder; the user's folder stays clean.
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    np.save(calib / "b.npy", rng.standard_normal((2, 3, 320, 320)).astype(np.float32))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "det"
    result = CliRunner().invoke(
        app,
        ["import", "edgemesh.lab.vision_models:tiny_detector", "--out", str(out),
         "--calibration", str(calib)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "int8  static-qdq" in result.output
    assert list(cwd.iterdir()) == []
