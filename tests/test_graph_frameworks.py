"""Real models from each framework, built in the test, imported, and checked
against the framework's own outputs (slow: each framework's exporter runs).

A framework that is not installed skips its test with the extra to install.
PaddlePaddle is not in `all` (paddle2onnx pins onnx<=1.17): it lives in its own
venv, named by $EDGEMESH_PADDLE_PYTHON, which `.ci/run` builds; the import runs
paddle2onnx and Paddle Inference there (edgemesh.graph.paddle_env) and this
process reads the ONNX file. The Paddle test skips only where neither that venv
nor an in-process paddle exists (a developer machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemesh.graph.manifest import GraphManifest

pytestmark = pytest.mark.slow


def _need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"'{module}' is not installed: pip install 'edgemesh[{extra}]'")


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(m: GraphManifest) -> None:
    assert set(m.precisions) == {"fp32", "fp16", "int8"}
    assert m.precisions["fp32"].accuracy.max_rel < 1e-3
    for entry in m.precisions.values():
        assert entry.accuracy is not None and entry.accuracy.samples > 0


def test_torch_export_program(tmp_path: Path) -> None:
    _need("torch", "import-torch")
    _need("onnxscript", "import-torch")
    import torch

    from edgemesh.graph.build import build_package
    from tests.graph_models import classifier

    model, (x,) = classifier()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (x.repeat(2, 1, 1, 1),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, tmp_path / "model.pt2")
    m = build_package(str(tmp_path / "model.pt2"), tmp_path / "pkg")
    assert m.source.form == "exported-program"
    assert m.inputs[0].shape[0] == -1  # the program's dynamic batch survived
    _check(m)
    xs = np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32)
    (got,) = _ort(tmp_path / "pkg" / "model.fp32.onnx", {m.inputs[0].name: xs})
    want = model(torch.from_numpy(xs)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_torchscript_file(tmp_path: Path) -> None:
    _need("torch", "import-torch")
    import torch

    from edgemesh.graph.build import BuildOptions, build_package
    from edgemesh.graph.sources import ImportOptions
    from tests.graph_models import two_heads

    model, (x,) = two_heads()
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "model.pt")
    m = build_package(
        str(tmp_path / "model.pt"),
        tmp_path / "pkg",
        BuildOptions(import_options=ImportOptions(input_shapes=((1, 3, 32, 32),))),
    )
    assert m.source.form == "torchscript" and len(m.outputs) == 2
    _check(m)


def _keras_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((24, 24, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5),
        ]
    )


def test_tensorflow_keras_and_saved_model(tmp_path: Path) -> None:
    _need("tensorflow", "import-tf")
    _need("tf2onnx", "import-tf")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edgemesh.graph.build import build_package

    model = _keras_model()
    model.save(tmp_path / "m.keras")
    model.export(str(tmp_path / "saved"))
    xs = np.random.default_rng(5).standard_normal((4, 24, 24, 3)).astype(np.float32)
    want = np.asarray(model(xs, training=False))
    for spec, form in [(tmp_path / "m.keras", "keras"), (tmp_path / "saved", "saved-model")]:
        out = tmp_path / f"pkg-{form}"
        m = build_package(str(spec), out)
        assert m.source.framework == "tensorflow" and m.source.form == form
        assert m.inputs[0].shape == (-1, 24, 24, 3) and m.task == "classifier"
        _check(m)
        (got,) = _ort(out / "model.fp32.onnx", {m.inputs[0].name: xs})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


PADDLE_MODEL = """
import sys, numpy as np, paddle
class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3)
        self.fc = paddle.nn.Linear(8, 6)
    def forward(self, x):
        return self.fc(paddle.nn.functional.relu(self.conv(x)).mean(axis=[2, 3]))
paddle.seed(0)
net = Net()
net.eval()
spec = [paddle.static.InputSpec([None, 3, 20, 20], "float32", "x")]
paddle.jit.save(net, sys.argv[1] + "/inference", input_spec=spec)
# Paddle's own (eager) answer on fixed inputs, for the test to hold the ONNX file to.
x = np.random.default_rng(7).standard_normal((3, 3, 20, 20)).astype(np.float32)
np.savez(sys.argv[2], x=x, y=net(paddle.to_tensor(x)).numpy())
"""


def _paddle_python() -> str:
    """The Python that has Paddle: $EDGEMESH_PADDLE_PYTHON's (a wrong path fails,
    never skips), else this one if paddle is installed here, else skip."""
    from edgemesh.graph.paddle_env import ENV, paddle_python

    python = paddle_python()
    if python is not None:
        return str(python)
    if importlib.util.find_spec("paddle") and importlib.util.find_spec("paddle2onnx"):
        return sys.executable
    pytest.skip(
        f"no Paddle environment: set {ENV} to the bin/python of a venv with paddlepaddle and "
        "paddle2onnx (.ci/run builds one), or pip install 'edgemesh[import-paddle]' here"
    )


def test_paddle_inference_model(tmp_path: Path) -> None:
    from edgemesh.graph.build import build_package

    python = _paddle_python()
    folder = tmp_path / "pd"
    folder.mkdir()
    # A separate process: Paddle's static-graph mode is process-global; and a file,
    # since Paddle's dy2static reads the Layer's source.
    script = tmp_path / "make_paddle_model.py"
    script.write_text(PADDLE_MODEL)
    expected = tmp_path / "paddle_out.npz"
    subprocess.run([python, str(script), str(folder), str(expected)], check=True)
    m = build_package(str(folder), tmp_path / "pkg")
    assert m.source.framework == "paddle" and m.inputs[0].shape == (-1, 3, 20, 20)
    assert m.source.version and m.source.version[0].isdigit()
    _check(m)
    # The package's fp32 graph, run here, against Paddle's own eager output.
    with np.load(expected) as want:
        (got,) = _ort(tmp_path / "pkg" / "model.fp32.onnx", {m.inputs[0].name: want["x"]})
        np.testing.assert_allclose(got, want["y"], rtol=1e-4, atol=1e-5)
    # Nothing of the conversion's scratch (the child's log, sample files) is in the package.
    held = {str(p.relative_to(tmp_path / "pkg")) for p in (tmp_path / "pkg").rglob("*")}
    assert {p for p in held if not (tmp_path / "pkg" / p).is_dir()} == {*m.files, "graph.json"}


def test_paddle_python_that_is_not_there_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemesh.errors import ConfigError
    from edgemesh.graph.paddle_env import ENV, paddle_python

    monkeypatch.setenv(ENV, str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(ConfigError, match=ENV):
        paddle_python()
    monkeypatch.setenv(ENV, "")
    assert paddle_python() is None


def test_paddle_missing_here_names_the_separate_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemesh.errors import MissingExtraError
    from edgemesh.graph import import_paddle
    from edgemesh.graph.imported import ImportOptions
    from edgemesh.graph.paddle_env import ENV

    if importlib.util.find_spec("paddle") and importlib.util.find_spec("paddle2onnx"):
        pytest.skip("paddle is installed in this environment")
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "m.pdiparams").write_bytes(b"")
    with pytest.raises(MissingExtraError, match=ENV):
        import_paddle.run(tmp_path / "m.json", tmp_path, ImportOptions())
