"""Tool-call plumbing without a model: the format a template teaches, messages
rewritten for templates without tools, parsing replies and streaming deltas."""

from __future__ import annotations

import json

import pytest

from edgemesh.chat_templates import HERMES, LLAMA3_JSON, fallback_for, knows_tools, tool_format
from edgemesh.gateway.tools import CallStream, messages_for_template, parse_calls

QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}"
    '{% endfor %}</tools>\nReturn <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>'
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)
LLAMA31_LIKE = (
    '{% if tools %}Respond with {"name": function name, "parameters": dictionary}.'
    "{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
)


def test_the_format_comes_from_the_template() -> None:
    assert tool_format(QWEN_LIKE) == HERMES and knows_tools(QWEN_LIKE)
    assert tool_format(LLAMA31_LIKE) == LLAMA3_JSON
    gemma = fallback_for("gemma3")
    assert not knows_tools(gemma) and tool_format(gemma) == HERMES


def test_a_template_without_tools_gets_them_described_and_calls_written_out() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    out = messages_for_template(messages, tools, HERMES, template_knows_tools=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    assert messages_for_template(messages, tools, HERMES, template_knows_tools=True) is messages


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
def test_replies_parse_into_tool_calls(fmt) -> None:
    key = fmt.arguments_key
    one = fmt.start + json.dumps({"name": "get", key: {"q": 'a "b" {c}'}}) + fmt.end
    two = fmt.start + json.dumps({"name": "put", key: {}}) + fmt.end
    content, calls = parse_calls(one + "\n" + two, fmt)
    assert content is None
    assert [c["function"]["name"] for c in calls] == ["get", "put"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"q": 'a "b" {c}'}
    assert parse_calls("just words", fmt) == ("just words", [])


def test_streamed_calls_reassemble_from_any_split() -> None:
    text = (
        '<tool_call>\n{"name": "get", "arguments": {"q": "x}\\"y", "n": [1, {"k": 2}]}}'
        "\n</tool_call>\n"
        '<tool_call>\n{"name": "put", "arguments": {}}\n</tool_call>'
    )
    for size in (1, 2, 3, 7, len(text)):
        stream = CallStream(HERMES)
        deltas = [d for i in range(0, len(text), size) for d in stream.feed(text[i : i + size])]
        deltas += list(stream.flush())
        calls: dict[int, dict] = {}
        for d in deltas:
            assert "content" not in d, d
            for c in d["tool_calls"]:
                entry = calls.setdefault(c["index"], {"name": "", "args": ""})
                entry["name"] += c.get("function", {}).get("name") or ""
                entry["args"] += c.get("function", {}).get("arguments") or ""
        assert [calls[i]["name"] for i in sorted(calls)] == ["get", "put"], size
        assert json.loads(calls[0]["args"]) == {"q": 'x}"y', "n": [1, {"k": 2}]}
        assert json.loads(calls[1]["args"]) == {}


def test_streamed_text_in_auto_mode_is_content() -> None:
    stream = CallStream(HERMES)
    deltas = list(stream.feed("Sunny")) + list(stream.feed(" today")) + list(stream.flush())
    assert "".join(d["content"] for d in deltas) == "Sunny today"
