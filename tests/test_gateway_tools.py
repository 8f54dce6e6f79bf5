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


def test_content_given_as_text_parts_is_written_out_as_text() -> None:
    # Found by the fuzz test: a past call whose content is a list of parts was a 500.
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}

    def parts(*texts: str) -> list[dict[str, str]]:
        return [{"type": "text", "text": t} for t in texts]

    messages = [
        {"role": "system", "content": parts("Be ", "brief.")},
        {"role": "assistant", "content": parts("Checking. "), "tool_calls": [call]},
        {"role": "tool", "content": parts("42")},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    out = messages_for_template(messages, tools, HERMES, template_knows_tools=False)
    assert out[0]["content"].startswith("Be brief.\n\n")
    written = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert out[1]["content"] == "Checking. " + written
    assert out[2]["content"] == "<tool_response>\n42\n</tool_response>"


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


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("llguidance")
    from edgemesh.sharding.package.tokenizer import HFTokenizer
    from tests.fixtures.tiny_models import _tokenizer

    tok = _tokenizer()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(
        path, bos_token_id=tok.token_to_id("<bos>"), eos_token_ids=[tok.token_to_id("<eos>")]
    )


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"key": {"enum": ["a", "b"]}},
            "required": ["key"],
            "additionalProperties": False,
        },
    },
}


def _allowed(mask, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def _drive(constraint, tokens: list[int], eos: int, budget: int) -> tuple[list[int], str]:
    """Feed ``tokens`` over and over (a model that always wants one more call)
    until the mask refuses the next one; returns (tokens fed, why it ended)."""
    fed: list[int] = []
    while len(fed) < budget:
        mask = constraint.mask()
        nxt = tokens[len(fed) % len(tokens)]
        if not _allowed(mask, nxt):
            return fed, "eos" if _allowed(mask, eos) else "refused"
        fed.append(nxt)
        if constraint.advance(nxt):
            return fed, "stopped"
    return fed, "length"


@pytest.mark.parametrize("budget", [60, 100, 150, 333])
def test_a_budget_closes_repeated_calls_before_max_tokens_cuts_one(
    tiny_tokenizer, budget: int
) -> None:
    """tool_choice "required" allows one or more calls; with max_tokens as the
    constraint's budget a reply that keeps calling ends (EOS) at a call's end
    while the budget still holds another, never cut inside a call."""
    from edgemesh.gateway.tools import tool_grammar

    tok = tiny_tokenizer
    call = '<tool_call>\n{"name": "lookup", "arguments": {"key": "a"}}\n</tool_call>'
    tokens = tok.encode(call, add_bos=False)
    grammar = tool_grammar([LOOKUP], "required", HERMES, tok)
    eos = sorted(tok.eos_ids)[0]
    if budget < len(tokens) + 1:
        pytest.skip("the budget does not hold one call")
    fed, why = _drive(grammar.constraint(budget), tokens, eos, budget)
    assert why == "eos", (why, len(fed), len(tokens))
    assert len(fed) % len(tokens) == 0 and len(fed) + 1 <= budget
    calls = len(fed) // len(tokens)
    assert calls >= 1
    # It closes only when another call (x2, + EOS) would not fit: no earlier.
    assert budget - len(fed) < 2 * len(tokens) + 1
    content, parsed = parse_calls(tok.decode(fed), HERMES)
    assert content is None and len(parsed) == calls
    # Without a budget the same grammar goes on (the engine's max_tokens cuts it).
    _, unbounded = _drive(grammar.constraint(), tokens, eos, budget)
    assert unbounded == "length"


def test_parallel_tool_calls_false_allows_one_call(tiny_tokenizer) -> None:
    from edgemesh.gateway.tools import tool_grammar

    tok = tiny_tokenizer
    call = '<tool_call>\n{"name": "lookup", "arguments": {"key": "b"}}\n</tool_call>'
    tokens = tok.encode(call, add_bos=False)
    grammar = tool_grammar([LOOKUP], "required", HERMES, tok, parallel=False)
    fed, why = _drive(grammar.constraint(500), tokens, sorted(tok.eos_ids)[0], 500)
    assert len(fed) == len(tokens) and why in ("stopped", "eos")


def test_free_text_in_auto_mode_is_not_closed_early(tiny_tokenizer) -> None:
    from edgemesh.gateway.tools import tool_grammar

    tok = tiny_tokenizer
    tokens = tok.encode("Sunny and warm today, with a breeze. ", add_bos=False)
    grammar = tool_grammar([LOOKUP], "auto", HERMES, tok)
    fed, why = _drive(grammar.constraint(30), tokens, sorted(tok.eos_ids)[0], 30)
    assert (len(fed), why) == (30, "length")
