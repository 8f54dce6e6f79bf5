"""Every example in examples/ is executed against a real server."""

from __future__ import annotations

import runpy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemesh.gateway import create_app
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gateway_url(default_gguf: Path) -> Iterator[str]:
    from tests.conftest import LiveServer

    service = load_service(
        ModelSource("gemma-3-270m", default_gguf, "gguf"),
        LocalOptions(threads=2, context_length=512, max_sequences=2),
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
