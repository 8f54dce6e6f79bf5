"""Every example in examples/ is executed against a real server."""

from __future__ import annotations

import runpy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemesh.gateway import create_app
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gateway_url(default_gguf: Path) -> Iterator[str]:
    from tests.conftest import LiveServer

    service = load_service(
        ModelSource("gemma-3-270m", default_gguf, "gguf"),
        LocalOptions(ServingLimits(threads=2, context_length=512, max_sequences=2)),
    )
    try:
        with LiveServer(create_app([service])) as live:
            yield live.url + "/v1"
    finally:
        service.close()


@pytest.mark.llamacpp
def test_chat_client_example_streams_text(gateway_url: str, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EDGEMESH_URL", gateway_url)
    module = runpy.run_path(str(ROOT / "examples" / "chat_client.py"))
    text = module["main"]("Name three colours.")
    assert len(text.split()) >= 2
    assert text.strip() in capsys.readouterr().out


@pytest.mark.llamacpp
def test_readme_curl_example_works(gateway_url: str) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- curl-example -->", 1)[1].split("```bash", 1)[1].split("```")[0]
    command = block.strip().replace("http://127.0.0.1:8000/v1", gateway_url)
    out = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True
    )
    assert '"text_completion"' in out.stdout and '"choices"' in out.stdout


@pytest.mark.llamacpp
def test_readme_sdk_example_works(gateway_url: str, capsys) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- sdk-example -->", 1)[1].split("```python", 1)[1].split("```")[0]
    code = block.replace("http://127.0.0.1:8000", gateway_url.removesuffix("/v1"))
    exec(compile(code, "README.md sdk-example", "exec"), {"__name__": "__main__"})
    assert len(capsys.readouterr().out.split()) >= 2


def test_pi_jetson_example_plans_a_split(tmp_path: Path) -> None:
    """The demo's `edgemesh plan` step on its boxes file, for a Qwen2.5-1.5B-shaped model."""
    import json

    from typer.testing import CliRunner

    from edgemesh.cli import app
    from edgemesh.sharding.planner.scenarios import synthetic_manifest

    synthetic_manifest(
        "qwen-1.5b-like", num_layers=28, hidden=1536, intermediate=8960, heads=12,
        kv_heads=2, head_dim=128, vocab=151936, accuracy={"fp32": 0.0, "int8": 0.01},
    ).save(tmp_path)  # fmt: skip
    boxes = ROOT / "examples" / "pi_jetson" / "boxes.json"
    result = CliRunner().invoke(
        app, ["plan", "--model", str(tmp_path), "--boxes", str(boxes), "--json"]
    )
    assert result.exit_code == 0, result.output
    # --json keeps stdout pure JSON; the note on int4 (no measurement in this
    # manifest) goes to stderr and names what stays allowed.
    plan = json.loads(result.stdout)
    assert "not measured for int4" in result.stderr and "fp32/fp16/int8" in result.stderr
    by_box = {s["box"]: s for s in plan["stages"]}
    # The GPU box is far faster, so it must get more layers than the Pi.
    assert set(by_box) <= {"pi5-8gb", "orin-nano-8gb"} and "orin-nano-8gb" in by_box
    if "pi5-8gb" in by_box:
        pi, orin = by_box["pi5-8gb"]["layers"], by_box["orin-nano-8gb"]["layers"]
        assert orin[1] - orin[0] > pi[1] - pi[0]
    for baseline in plan["baselines"].values():
        assert plan["bottleneck_ms"] <= baseline["bottleneck_ms"]
