"""The OpenAI API of a single box, driven by the official `openai` client
(and by raw HTTP for the inputs a well-behaved client never sends)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from edgemesh.gateway import create_app
from edgemesh.gateway.service import ModelService
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def service(default_gguf: Path) -> Iterator[ModelService]:
    svc = load_service(
        ModelSource("gemma-3-270m", default_gguf, "gguf"),
        LocalOptions(ServingLimits(threads=2, context_length=256, max_sequences=2, max_queue=1)),
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
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(client: openai.OpenAI, server: str) -> None:
    assert [m.id for m in client.models.list().data] == ["gemma-3-270m"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["models"] == ["gemma-3-270m"]


def test_completion(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="gemma-3-270m", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "France" in out.choices[0].text or "Paris" in out.choices[0].text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == 6


def test_streamed_completion_equals_the_plain_one(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "gemma-3-270m",
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "temperature": 0,
    }
    plain = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    plain = client.chat.completions.create(
        model="gemma-3-270m", messages=messages, max_tokens=24, temperature=0
    )
    text = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    assert len(text.split()) >= 3  # real words from the model, not an empty echo
    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def _post(server: str, path: str, body: object, **kw: object) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server + path, content=data, headers={"content-type": "application/json"}, timeout=30, **kw
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": "gemma-3-270m", "prompt": 5}, 400, "prompt"),
        ({"model": "gemma-3-270m", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "gemma-3-270m", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "gemma-3-270m", "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": "gemma-3-270m", "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": "gemma-3-270m", "prompt": "word " * 400}, 400, "prompt"),
        ({"model": "gemma-3-270m", "prompt": [1, 999_999_999]}, 400, "prompt"),
        ({"model": "gemma-3-270m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "gemma-3-270m"}, 400, "prompt"),
    ],
)
def test_bad_completion_requests_get_openai_errors(
    server: str, body: object, status: int, param: str | None
) -> None:
    resp = _post(server, "/v1/completions", body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gemma-3-270m", "messages": []}, "messages"),
        (
            {"model": "gemma-3-270m", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
        ),
        ({"model": "gemma-3-270m", "messages": "hello"}, "messages"),
        ({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
    ],
)
def test_bad_chat_requests_get_openai_errors(server: str, body: object, param: str) -> None:
    resp = _post(server, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_client_disconnect_mid_stream_frees_the_slot(server: str, service: ModelService) -> None:
    body = {
        "model": "gemma-3-270m",
        "prompt": "Count: 1, 2,",
        "max_tokens": 200,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert service.engine.load["active"] == 1
    deadline = time.monotonic() + 10
    while service.engine.load["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.engine.load == {"active": 0, "waiting": 0}
    assert not service.engine.pipeline.backends[0]._slots


def test_overload_gets_429_with_retry_after(default_gguf: Path) -> None:
    from tests.conftest import LiveServer

    # One decode slot and no queue: a second request while one streams must bounce.
    single = load_service(
        ModelSource("m", default_gguf, "gguf"),
        LocalOptions(ServingLimits(threads=2, context_length=256, max_sequences=1, max_queue=0)),
    )
    body = {"model": "m", "prompt": "Count: 1, 2,", "max_tokens": 200, "stream": True}
    try:
        with (
            LiveServer(create_app([single])) as live,
            httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as first,
        ):
            lines = first.iter_lines()  # keep a reference: dropping it closes the stream
            assert next(lines).startswith("data: ")
            second = _post(live.url, "/v1/completions", {**body, "stream": False})
            assert second.status_code == 429, second.text
            assert int(second.headers["retry-after"]) >= 1
            assert second.json()["error"]["type"] == "rate_limit_error"
    finally:
        single.close()


def test_api_keys_are_enforced(service: ModelService) -> None:
    from tests.conftest import LiveServer

    with LiveServer(create_app([service], api_keys=["s3cret"])) as live:
        assert httpx.get(live.url + "/v1/models").status_code == 401
        bad = httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "gemma-3-270m"


def test_dashboard_shows_this_box_the_shard_map_and_live_counters(
    server: str, client: openai.OpenAI
) -> None:
    import platform

    page = httpx.get(server + "/dashboard")
    assert page.status_code == 200 and "dashboard/static/dashboard.js" in page.text
    before = httpx.get(server + "/dashboard/state").json()
    (box,) = before["boxes"]
    assert box["summary"]["arch"] == platform.machine() and box["health"] == "ok"
    (model,) = before["models"]
    assert model["name"] == "gemma-3-270m"
    assert model["info"]["stages"][0]["layers"] == [0, model["info"]["layers"]]
    client.completions.create(model="gemma-3-270m", prompt="Hello", max_tokens=5, temperature=0)
    after = httpx.get(server + "/dashboard/state").json()
    assert after["models"][0]["stats"]["tokens"] >= model["stats"]["tokens"] + 5
    assert after["time"] > before["time"]


def test_dashboard_state_needs_the_api_key(service: ModelService) -> None:
    from tests.conftest import LiveServer

    with LiveServer(create_app([service], api_keys=["s3cret"])) as live:
        assert httpx.get(live.url + "/dashboard").status_code == 200
        assert httpx.get(live.url + "/dashboard/state").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(live.url + "/dashboard/state", headers=auth).status_code == 200
