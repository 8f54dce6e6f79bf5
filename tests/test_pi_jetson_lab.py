"""examples/pi_jetson/lab.py runs as a user runs it: two limited namespace boxes,
`edgemesh join` in each, the default model deployed over both, one chat
streamed through the mesh gateway, everything removed afterwards.

Needs root, iproute2, cgroups and the default model package (converted once
into the cache: several minutes the first time); a few minutes on 2 cores.
"""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path

import pytest

from edgemesh.lab.netns import skip_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")

LAB = Path(__file__).resolve().parents[1] / "examples" / "pi_jetson" / "lab.py"


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("pjl")}


def test_lab_streams_a_chat_over_both_boxes_and_cleans_up(capsys) -> None:
    from edgemesh.lab.cgroups import unavailable

    if unavailable():
        pytest.skip(unavailable())
    before = _namespaces()
    main = runpy.run_path(str(LAB))["main"]
    code = main(["--split", "--max-tokens", "12", "--subnet", "10.81.0"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    # One stage per box, both named in the plan and in where the stages ran.
    ran = out.split("where each stage ran")[1]
    assert "pi " in ran and "jetson " in ran, out
    assert "12 tokens" in out
    assert _namespaces() == before  # the lab removed its namespaces
