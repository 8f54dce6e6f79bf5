"""The command line: help texts, errors, and `edgemesh serve` as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from tests.conftest import free_port

runner = CliRunner()
COMMANDS = ["info", "serve", "join", "status", "plan", "convert", "generate", "deploy", "bench"]


def test_top_level_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_serve_with_a_missing_model_fails_clearly(tmp_path) -> None:
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 1
    assert "no model at" in result.output


def test_serve_with_a_corrupt_gguf_names_the_file(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a model at all")
    result = runner.invoke(app, ["serve", "--model", str(bad)])
    assert result.exit_code == 1
    assert "broken.gguf" in result.output and "not a GGUF" in result.output


@pytest.mark.llamacpp
def test_edgemesh_serve_answers_like_the_readme_says() -> None:
    """The README's first line ends in `edgemesh serve`; its example is a completion."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemesh.cli", "serve", "--port", str(port), "--threads", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "edgemesh serve did not come up"
            time.sleep(0.25)
        resp = httpx.post(
            url + "/v1/completions",
            timeout=60,
            json={
                "model": "gemma-3-270m",
                "prompt": "The capital of France is",
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        assert resp.status_code == 200
        assert "France" in resp.json()["choices"][0]["text"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
