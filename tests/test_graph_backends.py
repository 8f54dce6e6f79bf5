"""Graph-backend conformance (every backend in the registry: runs or skips with
its reason), the per-box engine cache, and the backend/precision choice."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")

from edgemesh.backends import registry
from edgemesh.backends.graph_base import GraphOptions
from edgemesh.errors import ConfigError, InferenceError
from edgemesh.graph.build import BuildOptions, build_package
from edgemesh.graph.manifest import GraphManifest
from edgemesh.graph.select import box_key, choose


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calib = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    np.save(calib / "x.npy", rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path_factory.mktemp("gb") / "cls"
    build_package("tests.graph_models:classifier", out, BuildOptions(calibration=calib))
    return out


def test_registry_lists_graph_backends_apart_from_llm_ones() -> None:
    assert set(registry.graph_backends()) == {"onnxruntime", "openvino", "tensorrt", "rknn"}
    for name, cls in registry.graph_backends().items():
        assert registry.all_backends()[name] is not cls  # same names, other contract
    with pytest.raises(ConfigError, match="unknown graph backend"):
        registry.get_graph("nope")


def test_listing_graph_backends_imports_no_runtime() -> None:
    code = (
        "import sys; from edgemesh.backends import registry; registry.graph_backends(); "
        "heavy = {'onnxruntime', 'openvino', 'tensorrt', 'rknnlite', 'torch'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["onnxruntime", "openvino", "tensorrt", "rknn"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_conformance(name: str, precision: str, package: Path, tmp_path: Path) -> None:
    cls = registry.get_graph(name)
    reason = cls.available()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    if precision not in cls.capabilities.precisions:
        pytest.skip(f"{name} does not run {precision}")
    m = GraphManifest.load(package)
    graph = m.verify(package, precision)
    options = GraphOptions(threads=1, device=cls.capabilities.devices[0], engine_dir=tmp_path)
    x = np.random.default_rng(7).standard_normal((4, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(package / "model.fp32.onnx")).run(None, {"input": x})[0]
    backend = cls(graph, m.inputs, precision, options)
    (batched,) = backend.run({"input": x})
    rows = np.concatenate([backend.run({"input": x[i : i + 1]})[0] for i in range(4)])
    assert batched.shape == (4, 10) and batched.dtype == np.float32
    scale = float(np.abs(want).max())
    # batch == one by one (int8 kernels may pick other paths per batch size: rounding noise)
    np.testing.assert_allclose(rows, batched, atol=1e-4 if precision == "fp32" else 0.01 * scale)
    # fp32 engines reassociate sums differently (OpenVINO's CPU kernels: ~1e-3 relative).
    tol = (2e-3 if precision == "fp32" else 0.25) * scale
    np.testing.assert_allclose(batched, want, atol=tol)
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(InferenceError, match="closed"):
        backend.run({"input": x})
    if cls.capabilities.compiled_format is not None:
        again = cls(graph, m.inputs, precision, options)
        assert again.compiled_from == "cache"  # the per-box artifact was reused
        np.testing.assert_allclose(again.run({"input": x})[0], batched, rtol=1e-5, atol=1e-5)
        again.close()


def _fp(backends: list[str], precision: str) -> dict:
    return {
        "backends": backends,
        "precision": precision,
        "arch": "x86_64",
        "cpu": {"model": "test cpu", "features": ["avx2"]},
        "accelerators": [],
    }


def test_precision_choice_follows_measured_accuracy_and_budget(package: Path) -> None:
    m = GraphManifest.load(package)
    fp = _fp(["onnxruntime"], "int8")
    assert choose(m, fingerprint=fp).precision == "int8"
    worse = dataclasses.replace(m.precisions["int8"].accuracy, loss=0.2)
    m.precisions["int8"] = dataclasses.replace(m.precisions["int8"], accuracy=worse)
    c = choose(m, fingerprint=fp)
    # int8 over the 0.10 budget; fp16 has no native kernels on a CPU: fp32.
    assert c.precision == "fp32"
    assert "accuracy loss 0.2000 > max_accuracy_loss 0.1000" in c.reason
    assert "fp16: no native fp16 kernels" in c.reason
    assert choose(m, fingerprint=fp, max_accuracy_loss=0.3).precision == "int8"
    assert choose(m, fingerprint=_fp(["onnxruntime"], "int4")).precision == "fp32"


def test_backend_choice_skips_what_cannot_run_here(package: Path) -> None:
    m = GraphManifest.load(package)
    c = choose(m, fingerprint=_fp(["tensorrt", "rknn", "onnxruntime"], "fp16"))
    assert c.backend == "onnxruntime"  # no GPU or NPU on the test host
    assert c.precision == "fp32"  # fp16 is emulated on a CPU


def test_box_key_changes_with_the_hardware() -> None:
    cls = registry.get_graph("openvino")
    a = box_key(cls, "cpu", _fp([], "int8"))
    other = _fp([], "int8")
    other["cpu"] = {"model": "another cpu", "features": ["avx2"]}
    assert a.startswith("openvino-") and a != box_key(cls, "cpu", other)
    assert a == box_key(cls, "cpu", _fp([], "int8"))


def test_a_non_onnxruntime_engine_is_measured_on_the_box(package: Path) -> None:
    from edgemesh.graph.service import GraphServeOptions, load_graph_service

    if registry.get_graph("openvino").available() is not None:
        pytest.skip(f"openvino: {registry.get_graph('openvino').available()}")
    service = load_graph_service(
        package, GraphServeOptions(backend="openvino", precision="int8", threads=1)
    )
    try:
        acc = service.info["accuracy_on_engine"]
        assert acc is not None and acc["samples"] == 16 and acc["sample_source"] == "calibration"
        assert 0 <= acc["loss"] <= 1 and acc["max_abs"] > 0
        cached = list((package / "engines").glob("openvino-*/accuracy.int8.json"))
        assert len(cached) == 1
    finally:
        service.close()
