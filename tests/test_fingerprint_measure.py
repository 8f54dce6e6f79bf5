"""`--measure`: real benchmarks on this machine, cached on disk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from edgemesh.fingerprint import collect, kernels, measure
from edgemesh.fingerprint.model import CpuInfo

runner = CliRunner()


def test_measure_is_cached_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "measure"
    first = collect(measure=True, cache_dir=cache)
    m = first.measurement
    assert m is not None and not m.cached
    assert m.memory_bandwidth_gbps > 0
    # Weights are sized past the last-level cache so they stream from RAM.
    from edgemesh.fingerprint.measure import last_level_cache_bytes

    llc = last_level_cache_bytes() or 0
    cap = max(16 << 20, first.memory.limit_bytes // 8)
    assert m.shapes["weight_bytes"] == min(max(64 << 20, 2 * llc), cap)
    keys = {f.key for f in m.matmul}
    assert "cpu/fp32" in keys
    if "onnxruntime" in first.installed:
        assert "onnxruntime/fp32" in keys
        assert keys | set(m.skipped) >= {
            f"onnxruntime/{p}" for p in kernels.PRECISIONS["onnxruntime"]
        }
    assert all(f.gflops > 0 and f.bandwidth_gbps > 0 for f in m.matmul)

    files = list(cache.glob("*.json"))
    assert [p.name for p in files] == [f"{m.key}.json"]
    mtime = files[0].stat().st_mtime_ns

    # The CLI reads the same cache: nothing is measured again.
    result = runner.invoke(app, ["info", "--json", "--measure", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["measure"]["cached"] is True
    assert d["measure"]["key"] == m.key
    assert files[0].stat().st_mtime_ns == mtime

    profile = d["profile"]
    assert profile == first.profile()
    assert profile["id"] == first.id
    assert profile["memory_limit_bytes"] == first.memory.limit_bytes
    assert profile["backends"] == first.installed
    assert profile["link_gbps"] is None and profile["link_latency_ms"] is None
    assert set(profile["compute"]) == {
        f.key for f in m.matmul if f.backend in set(first.installed) | {"cpu"}
    }
    for figures in profile["compute"].values():
        assert set(figures) == {"gflops", "bandwidth_gbps"}
        assert figures["gflops"] > 0 and figures["bandwidth_gbps"] > 0


def test_a_spent_budget_still_measures_the_reference() -> None:
    # On a loaded box the budget runs out; the cpu reference must still be
    # there, since engines without a probe of their own are priced from it.
    m = measure.run_benchmarks(
        ["onnxruntime", kernels.REFERENCE], threads=1, memory_limit_bytes=1 << 30, budget_s=0.0
    )
    assert [f.key for f in m.matmul] == ["cpu/fp32"]
    assert set(m.skipped) == {f"onnxruntime/{p}" for p in kernels.PRECISIONS["onnxruntime"]}
    assert all("time budget" in why for why in m.skipped.values())


def test_cache_key_follows_hardware_and_libraries() -> None:
    cpu = CpuInfo("Test CPU", "GenuineIntel", 4, 4.0, ("avx2",))
    base = measure.cache_key(cpu, 8 << 30, ["cpu"])
    assert base == measure.cache_key(cpu, 8 << 30, ["cpu"])
    assert base != measure.cache_key(CpuInfo("Test CPU", None, 4, 2.0, ("avx2",)), 8 << 30, ["cpu"])
    assert base != measure.cache_key(cpu, 4 << 30, ["cpu"])
    assert base != measure.cache_key(cpu, 8 << 30, ["onnxruntime", "cpu"])
    assert "numpy" in measure.library_versions(["cpu"])


def test_a_corrupt_cache_file_is_ignored(tmp_path: Path) -> None:
    bad = tmp_path / "0123456789abcdef.json"
    bad.write_text("{not json")
    assert measure._load(bad) is None
    bad.write_text(json.dumps({"key": "x"}))  # missing fields
    assert measure._load(bad) is None


def test_cache_dir_comes_from_edgemesh_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEMESH_CACHE_DIR", str(tmp_path))
    assert measure.default_cache_dir() == tmp_path / "measure"
    monkeypatch.delenv("EDGEMESH_CACHE_DIR")
    assert measure.default_cache_dir() == Path.home() / ".cache" / "edgemesh" / "measure"


def test_measurable_backends_keep_their_order() -> None:
    installed = ["openvino", "llamacpp", "onnxruntime"]
    assert measure.measurable(installed) == ["openvino", "onnxruntime", "cpu"]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
@pytest.mark.parametrize("precision", kernels.PRECISIONS["openvino"])
def test_openvino_matmul_runs_at_each_precision(precision: str) -> None:
    # Small weights keep this quick; it checks the graph compiles and runs.
    shape = kernels.Shape(k=512, layers=2)
    gflops, gbps = kernels.bench_matmul("openvino", precision, shape, threads=1, seconds=0.1)
    assert gflops > 0 and gbps > 0


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
def test_onnx_int4_graph_uses_matmulnbits() -> None:
    import onnx

    model = onnx.load_from_string(kernels._onnx_model("int4", kernels.Shape(k=256, layers=2)))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "MatMulNBits"]
    assert {n.domain for n in model.graph.node} == {"com.microsoft"}
    onnx.checker.check_model(model)  # contrib ops are checked by name only


def test_last_level_cache_is_read_from_sysfs(tmp_path: Path) -> None:
    from edgemesh.fingerprint.measure import last_level_cache_bytes

    for i, (level, kind, size) in enumerate(
        [
            (1, "Data", "48K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "2048K"),
            (3, "Unified", "300M"),
        ]
    ):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 300 * 1024 * 1024
    assert last_level_cache_bytes(tmp_path / "missing") is None
