"""An out-of-tree backend takes the same path as an in-tree one: installed as
a distribution with an ``edgemesh.backends`` entry point, it judges the box
itself (``suits``), the fingerprint lists it, and the planner places it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BoxFacts
from edgemesh.fingerprint import collect, kernels
from edgemesh.fingerprint.measure import measurable
from edgemesh.fingerprint.model import MatmulFigure, Measurement
from edgemesh.fingerprint.policy import MEMORY_POOR_BYTES
from edgemesh.sharding.planner.boxes import BoxProfile
from edgemesh.sharding.planner.plan import plan
from edgemesh.sharding.planner.scenarios import gemma_270m_like

# A real backend: onnxruntime's range runtime under another name, for a
# made-up accelerator, preferring fp16 like a tensor-core part would.
PLUGIN = '''
from edgemesh.backends.base import BoxFacts
from edgemesh.backends.onnxruntime import OnnxRuntimeBackend


class FrobBackend(OnnxRuntimeBackend):
    """Runs on every box that has a frob accelerator (and, in this test, on any)."""

    name = "frob"
    label = "Frob"
    module = "numpy"  # its runtime is importable wherever edgemesh is
    extra = "frob"
    preferred_precision = "fp16"
    matmul_probe = None  # no micro-benchmark of its own: priced from the reference

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        if "frob-npu" in box.accelerators:
            return 100
        return 60 if box.arch else None
'''


@pytest.fixture
def frob_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``pip install edgemesh-frob`` as it lands on disk: a module and a dist-info."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "edgemesh_frob.py").write_text(PLUGIN)
    info = site / "edgemesh_frob-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgemesh-frob\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [edgemesh.backends]
            frob = edgemesh_frob:FrobBackend
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("edgemesh_frob", None)


def test_without_the_plugin_no_frob() -> None:
    assert "frob" not in registry.names()


def test_the_registry_ranks_the_plugin_by_its_own_judgement(frob_installed: Path) -> None:
    assert "frob" in registry.names()
    x86 = BoxFacts("x86_64", "GenuineIntel", ("avx2",), (), 16 << 30)
    assert registry.ranked(x86) == ["frob", "openvino", "onnxruntime"]
    jetson = BoxFacts("aarch64", None, ("asimddp",), ("jetson-gpu",), 32 << 30)
    assert registry.ranked(jetson) == ["frob", "tensorrt", "llamacpp", "onnxruntime"]
    frob_box = BoxFacts("aarch64", None, (), ("frob-npu", "jetson-gpu"), 32 << 30)
    assert registry.ranked(frob_box)[0] == "frob"


def test_the_fingerprint_chooses_it_and_the_planner_plans_it(frob_installed: Path) -> None:
    fp = collect()
    assert fp.backends[0] == "frob" and fp.installed[0] == "frob"
    poor = fp.memory.limit_bytes < MEMORY_POOR_BYTES
    assert fp.precision == ("int4" if poor else "fp16")  # the plugin's preference
    # No probe of its own: the box's measurement prices it from the numpy reference.
    assert "frob" not in measurable(fp.installed)
    fp.measurement = _reference_only()
    box = BoxProfile.from_dict(fp.profile())
    assert box.backends[0] == "frob"
    assert box.compute["frob/fp32"].derived_from == "cpu/fp32"
    assert box.runnable()[0][0] == "frob"
    result = plan(gemma_270m_like(), [box])
    assert [s.backend for s in result.stages] == ["frob"]
    assert result.stages[0].box == fp.id


def _reference_only() -> Measurement:
    """A real measurement of the numpy reference alone, on small weights (the
    full ``--measure`` sizes weights past the last-level cache: minutes here)."""
    shape = kernels.Shape(k=512, layers=4)
    gflops, gbps = kernels.bench_matmul("cpu", "fp32", shape, threads=1, seconds=0.2)
    return Measurement(
        key="",
        matmul=[MatmulFigure("cpu", "fp32", gflops, gbps)],
        memory_bandwidth_gbps=kernels.memory_bandwidth(16 << 20, seconds=0.1),
        shapes={"k": shape.k, "n": shape.k, "threads": 1},
        versions={},
        skipped={},
        seconds=0.0,
        measured_at="",
    )
