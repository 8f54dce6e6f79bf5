"""Structured output on every ONNX-path backend (the llama.cpp path is in
test_gateway_openai.py, the mesh in test_gateway_mesh.py): the mask is applied
to the logits in the pick, so no backend knows about grammars. A tiny
converted model; its chat template is a tool-aware one given by file, so the
tools are rendered by the template itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from edgemesh.backends import registry
from edgemesh.gateway import create_app
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource
from tests.test_gateway_tools import QWEN_LIKE

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    },
}
BACKENDS = [b for b in ("onnxruntime", "openvino") if registry.get(b).available() is None]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import convert_tiny_model

    return convert_tiny_model("qwen2", tmp_path_factory.mktemp("backends"), precisions=("fp32",))


@pytest.fixture(scope="module", params=BACKENDS)
def client(
    request: pytest.FixtureRequest, package: Path, tmp_path_factory
) -> Iterator[openai.OpenAI]:
    from tests.conftest import LiveServer

    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(QWEN_LIKE)
    svc = load_service(
        ModelSource("tiny", package, "package"),
        LocalOptions(
            threads=1,
            context_length=512,
            max_sequences=4,
            backend=request.param,
            precision="fp32",
            chat_template=template,
        ),
    )
    try:
        with LiveServer(create_app([svc])) as live:
            yield openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
    finally:
        svc.close()


def test_json_schema_and_tool_calls_on_each_backend(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json"}],
        max_tokens=60,
        temperature=2.0,
        n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    calls = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "pick one"}],
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "pick"}},
        max_tokens=120,
        temperature=1.0,
    )
    (call,) = calls.choices[0].message.tool_calls
    assert call.function.name == "pick"
    jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
