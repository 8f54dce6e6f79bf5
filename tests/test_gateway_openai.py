"""The rest of the OpenAI API (issue 16), driven by the official `openai` client
against a served default model: n, logprobs, echo, prompt lists, stop, seed,
logit_bias, usage in streams, embeddings, structured output and tool calls,
metrics and request ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from edgemesh.gateway import create_app
from edgemesh.gateway.service import ModelService
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource

pytestmark = pytest.mark.llamacpp
M = "gemma-3-270m"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def service(default_gguf: Path) -> Iterator[ModelService]:
    svc = load_service(
        ModelSource(M, default_gguf, "gguf"),
        # 512: the tools' system message (~200 tokens) plus a tool reply's longest form.
        LocalOptions(ServingLimits(threads=2, context_length=512, max_sequences=4, max_queue=16)),
    )
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service: ModelService) -> Iterator[str]:
    from tests.conftest import LiveServer

    with LiveServer(create_app([service])) as live:
        yield live.url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_n_samples_are_independent_and_seeded(client: openai.OpenAI, service: ModelService) -> None:
    kw = {"model": M, "prompt": "My favourite food is", "max_tokens": 6, "temperature": 1.2}
    a = client.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # the samples differ
    assert a.usage.completion_tokens <= 18 and a.usage.prompt_tokens > 0
    # The samples share the prompt's prefill (a KV copy); greedy, each equals n=1.
    forks = service.engine.stats.forks
    greedy = {**kw, "temperature": 0.0}
    alone = client.completions.create(**greedy).choices[0].text
    three = client.completions.create(n=3, **greedy)
    assert [c.text for c in three.choices] == [alone] * 3
    assert service.engine.stats.forks == forks + 2
    # Alone on the box, a seed repeats (batched numerics differ by batch shape).
    one = [client.completions.create(seed=9, **kw).choices[0].text for _ in range(2)]
    assert one[0] == one[1]


def test_prompt_list_and_token_id_prompts(client: openai.OpenAI, service: ModelService) -> None:
    texts = ["The capital of France is", "One, two, three,"]
    out = client.completions.create(model=M, prompt=texts, max_tokens=5, temperature=0)
    assert len(out.choices) == 2
    ids = [service.tokenizer.encode(t) for t in texts]
    by_ids = client.completions.create(model=M, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in out.choices]
    single = client.completions.create(model=M, prompt=ids[1], max_tokens=5, temperature=0)
    assert single.choices[0].text == out.choices[1].text
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)


def test_completion_logprobs_with_echo(client: openai.OpenAI, service: ModelService) -> None:
    prompt = "The capital of France is"
    n_prompt = len(service.tokenizer.encode(prompt))
    out = client.completions.create(
        model=M, prompt=prompt, max_tokens=3, temperature=0, logprobs=3, echo=True
    )
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    for tok, best, top in zip(
        lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=True
    ):
        assert len(top) == 3
        assert best == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top
        assert tok in top
    assert lp.text_offset[1] == len(lp.tokens[0])
    # echo with max_tokens 0 only scores the prompt (lm-eval's loglikelihood style)
    scored = client.completions.create(
        model=M, prompt=prompt, max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:n_prompt], abs=1e-4
    )


def test_chat_logprobs_plain_and_streamed(client: openai.OpenAI) -> None:
    kw = {"model": M, "messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True}
    out = client.chat.completions.create(top_logprobs=2, **kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    stream = client.chat.completions.create(top_logprobs=2, stream=True, **kw)
    streamed = [
        e
        for ch in stream
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [c.token for c in content]


def test_stop_matches_across_token_boundaries(client: openai.OpenAI) -> None:
    kw = {"model": M, "prompt": "Once upon a time", "temperature": 0}
    free = client.completions.create(max_tokens=12, logprobs=0, **kw).choices[0]
    tokens = free.logprobs.tokens
    # A stop string made of the end of one token and the start of the next.
    i = next(k for k in range(2, len(tokens) - 1) if len(tokens[k]) > 1 and len(tokens[k + 1]) > 1)
    stop = tokens[i][-1] + tokens[i + 1][:2]
    cut = free.text.index(stop)
    stopped = client.completions.create(max_tokens=12, stop=[stop], **kw).choices[0]
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop"
    streamed = client.completions.create(max_tokens=12, stop=[stop], stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free.text[:cut]


def test_logit_bias_forces_a_token(client: openai.OpenAI, service: ModelService) -> None:
    (target,) = service.tokenizer.encode(" banana", add_bos=False)[:1]
    out = client.completions.create(
        model=M, prompt="Hello", max_tokens=4, temperature=0.8, logit_bias={str(target): 100}
    )
    assert out.choices[0].text == service.tokenizer.decode([target] * 4)


def test_stream_usage_and_user(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=M,
            prompt="Hi",
            max_tokens=4,
            stream=True,
            user="tester-1",
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_models_retrieve(client: openai.OpenAI) -> None:
    assert client.models.retrieve(M).id == M
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_embeddings_are_unit_vectors(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model=M, input=["the cat sat", "the cat sat", "quantum flux"])
    vecs = [d.embedding for d in out.data]
    assert len(vecs[0]) == 640
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-4)
    assert vecs[0] == pytest.approx(vecs[1], abs=1e-5) and vecs[0] != vecs[2]
    short = client.embeddings.create(model=M, input="the cat sat", dimensions=64)
    assert len(short.data[0].embedding) == 64


@pytest.mark.parametrize("temperature", [0.0, 2.0])  # 1.5 in test_gateway_mesh.py
def test_json_schema_output_is_always_valid(client: openai.OpenAI, temperature: float) -> None:
    out = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "Describe a person."}],
        # The budget a real client gives: PERSON's longest reply is ~130 bytes (a
        # 12-character name of \uXXXX escapes is 72) and a token is at least a byte.
        max_tokens=160,
        temperature=temperature,
        n=3,
        seed=1,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "strict": True, "schema": PERSON},
        },
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_mode(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = out.choices[0].message.content
    assert content.startswith("{")
    if out.choices[0].finish_reason == "stop":  # free strings may outrun max_tokens
        assert isinstance(json.loads(content), dict)


def _check_call(call: object, tools: list[dict]) -> None:
    fn = call.function  # type: ignore[attr-defined]
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == fn.name)
    jsonschema.validate(json.loads(fn.arguments), schema)
    assert call.id.startswith("call_")  # type: ignore[attr-defined]


@pytest.mark.parametrize("temperature", [1.5])  # greedy: test_tool_calls_stream_as_deltas
def test_tool_choice_required_and_named(client: openai.OpenAI, temperature: float) -> None:
    tools = [WEATHER, TIME]
    out = client.chat.completions.create(
        model=M,
        messages=ASK,
        tools=tools,
        tool_choice="required",
        # One get_weather call is at most ~180 bytes (a 16-character city of
        # escapes); further calls are closed by the grammar's budget (grammar.Constraint).
        max_tokens=200,
        temperature=temperature,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, tools)
    named = client.chat.completions.create(
        model=M,
        messages=ASK,
        tools=tools,
        max_tokens=80,
        temperature=temperature,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _check_call(call, tools)


def test_tool_choice_none_and_auto(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model=M, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=10, temperature=0
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    auto = client.chat.completions.create(
        model=M, messages=ASK, tools=[WEATHER], max_tokens=60, temperature=0, n=2, seed=3
    )
    for choice in auto.choices:
        for call in choice.message.tool_calls or []:
            _check_call(call, [WEATHER])
        assert choice.message.tool_calls or choice.message.content


def test_tool_calls_stream_as_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=M,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or d.id
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and calls
    for entry in calls.values():
        assert entry["name"] == "get_weather" and entry["id"].startswith("call_")
        jsonschema.validate(json.loads(entry["arguments"]), WEATHER["function"]["parameters"])


def test_a_tool_conversation_renders(client: openai.OpenAI) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = client.chat.completions.create(
        model=M,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert out.choices[0].message.content


def test_request_ids_metrics_and_targets(
    server: str, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(server + "/v1/models", headers={"x-request-id": "my-id-42"})
    assert resp.headers["x-request-id"] == "my-id-42"
    with caplog.at_level("INFO", logger="edgemesh.gateway"):
        out = client.completions.with_raw_response.create(
            model=M, prompt="Hi", max_tokens=2, extra_headers={"x-request-id": "trace-7"}
        )
    assert out.headers["x-request-id"] == "trace-7"
    carried = [r.getMessage() for r in caplog.records if "trace-7" in r.getMessage()]
    assert any("completion: 1 prompt(s)" in m for m in carried)  # the handler's line
    assert any("/v1/completions -> 200" in m for m in carried)  # the access line
    assert httpx.get(server + "/v1/models").headers["x-request-id"].startswith("req-")
    client.chat.completions.create(model=M, messages=ASK, max_tokens=4, stream=True).close()
    client.completions.create(model=M, prompt="Hi", max_tokens=3)
    text = httpx.get(server + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["edgemesh_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/v1/models", "200")] >= 2
    ttft = [
        s
        for s in families["edgemesh_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert ttft and ttft[0].value >= 1
    for name in (
        "edgemesh_queue_depth",
        "edgemesh_running_sequences",
        "edgemesh_kv_used_ratio",
        "edgemesh_box_memory_used_bytes",
        "edgemesh_stage_step_seconds",
        "edgemesh_inter_token_latency_seconds",
        "edgemesh_completion_tokens",
    ):
        assert name in families, name
    assert M in httpx.get(server + "/metrics/json").json()
    (target, *_) = httpx.get(server + "/metrics/targets").json()
    assert target["targets"] == [server.removeprefix("http://")]


def _post(server: str, body: bytes, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(
        server + path, content=body, headers={"content-type": "application/json"}, timeout=30
    )


def _json(**kw: object) -> bytes:
    return json.dumps({"model": M, "prompt": "hi", "max_tokens": 2, **kw}).encode()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"\xff\xfe{}", 400, None),
        (b'{"model": "gemma-3-270m", "prompt": "\\ud800"}', 400, "prompt"),
        (b"[" * 5000 + b"]" * 5000, 400, None),
        (b'{"model": "gemma-3-270m", "prompt": {"a": ' * 40 + b"1" + b"}" * 41, 400, None),
        (
            b'{"model": "gemma-3-270m", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
            400,
            None,
        ),
        (b'{"model": "gemma-3-270m", "prompt": "hi", "temperature": NaN}', 400, None),
        (b'{"model": "gemma-3-270m", "prompt": "hi", "temperature": 1e999}', 400, "temperature"),
        (_json(n=10_000), 400, "n"),
        (_json(max_tokens=10**12), 400, "max_tokens"),
        (_json(logprobs=100), 400, "logprobs"),
        (_json(logprobs="yes"), 400, "logprobs"),
        (_json(seed=2**70), 400, "seed"),
        (_json(logit_bias={"abc": 1}), 400, "logit_bias"),
        (_json(prompt=[[1, 2], "x"]), 400, "prompt"),
        (_json(stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage"),
        (_json(max_tokens=0), 400, "max_tokens"),
        (b"x" * (9 << 20), 413, None),
    ],
)
def test_no_input_reaches_a_5xx(server: str, body: bytes, status: int, param: str | None) -> None:
    resp = _post(server, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "bogus"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ],
)
def test_bad_chat_features_get_400(server: str, extra: dict, param: str | None) -> None:
    body = {"model": M, "messages": ASK, "max_tokens": 2, **extra}
    resp = _post(server, json.dumps(body).encode(), "/v1/chat/completions")
    assert resp.status_code == 400, resp.text
    if param is not None:
        assert resp.json()["error"]["param"] == param
