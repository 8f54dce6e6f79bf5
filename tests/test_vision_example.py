"""examples/vision/run_demo.py, executed: import -> serve -> tritonclient frames."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_line_inspection_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch", reason="the demo builds its model with torch (import-torch)")
    pytest.importorskip("tritonclient.http", reason="the demo's client is tritonclient[http]")
    demo = runpy.run_path(str(ROOT / "examples" / "vision" / "run_demo.py"))
    try:
        result = demo["main"](["--frames", "24", "--workdir", str(tmp_path)])
    finally:
        sys.path[:] = [p for p in sys.path if "examples/vision" not in p]
        sys.modules.pop("client", None)
        sys.modules.pop("frames", None)
    out = capsys.readouterr().out
    assert result["frames"] == 24 and sum(result["verdicts"].values()) == 24
    assert "latency ms: p50" in out and result["p50_ms"] > 0
    assert result["engine"]["accuracy"]["sample_source"] == "calibration"
    assert (tmp_path / "line" / "graph.json").is_file()
