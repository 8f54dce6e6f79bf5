"""`edgemesh serve --model PACKAGE`: a converted package served by one box, in process.

The tiny Qwen3 package is served by the real CLI (a subprocess on loopback)
and queried through the OpenAI client; greedy output must equal
`edgemesh generate` on the same package, backend and precision.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from edgemesh.cli import app
from edgemesh.errors import ConfigError
from edgemesh.local import choose_package_runtime
from edgemesh.sharding.package.manifest import Manifest
from tests.conftest import free_port
from tests.fixtures.tiny_models import shared_tiny_package

pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox"
MAX_TOKENS = 16
runner = CliRunner()


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package("qwen3")


def _generate(package: Path, backend: str, precision: str, *extra: str) -> dict:
    result = runner.invoke(
        app,
        [
            "generate", str(package), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
            "--backend", backend, "--precision", precision, "--ignore-eos", "--json", *extra,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def served(package: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`edgemesh serve --model PACKAGE` with the box's own choice of backend/precision."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemesh", "serve", "--model", str(package),
         "--port", str(port), "--threads", "1", "--max-sequences", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read() if proc.stdout else "serve exited")
            assert time.monotonic() < deadline, "edgemesh serve did not come up"
            time.sleep(0.25)
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_serve_package_is_greedy_equal_to_generate(
    package: Path, served: tuple[str, subprocess.Popen[str]]
) -> None:
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60)
    model = client.models.list().data[0]
    assert model.id == package.name
    info = model.model_extra["edgemesh"]
    backend, precision = info["backend"], info["precision"]
    assert info["stages"] == [
        {
            "box": "local",
            "layers": [0, 3],
            "backend": backend,
            "precision": precision,
            "in_process": True,
        }
    ]
    # The box's fingerprint made the choice; the same function decides here.
    assert (backend, precision) == choose_package_runtime(Manifest.load(package))[:2]

    want = _generate(package, backend, precision)
    got = client.completions.create(
        model=model.id,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert got.usage.completion_tokens == len(want["token_ids"]) == MAX_TOKENS
    assert got.choices[0].text == want["text"]

    # A streamed chat turn: the same tokens as `generate --chat`.
    want_chat = _generate(package, backend, precision, "--chat")
    stream = client.chat.completions.create(
        model=model.id,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == want_chat["text"]


def test_package_runtime_choice_follows_options_and_accuracy(package: Path) -> None:
    manifest = Manifest.load(package)
    assert choose_package_runtime(manifest, backend="onnxruntime", precision="fp16")[:2] == (
        "onnxruntime",
        "fp16",
    )
    # Without options the box's own precision is used when the package has it
    # within the accuracy budget; one over budget moves towards fp32.
    from dataclasses import replace

    from edgemesh.fingerprint import collect

    own = collect().to_dict()["precision"]
    fine = replace(manifest, accuracy={"fp32": 0.0, "fp16": 0.0, "int8": 0.01, "int4": 0.05})
    assert choose_package_runtime(fine, backend="onnxruntime")[1] == own
    lossy = replace(manifest, accuracy={"fp32": 0.0, "fp16": 0.2, "int8": 0.3, "int4": 0.5})
    _, precision, why = choose_package_runtime(lossy, backend="onnxruntime")
    assert precision == "fp32" and "accuracy loss" in why
    with pytest.raises(ConfigError, match="files, not converted packages"):
        choose_package_runtime(manifest, backend="llamacpp", precision="fp32")
    with pytest.raises(ConfigError, match=r"fp8: the model has no fp8 weights"):
        choose_package_runtime(manifest, backend="onnxruntime", precision="fp8")
