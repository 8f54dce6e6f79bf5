"""Schemathesis fuzzes the gateway from its own OpenAPI schema: no input may get a 5xx.

The app runs a tiny converted model (onnxruntime, fp32, a 96-token context)
and a tiny graph model (/v2), so generated requests that pass validation
finish in milliseconds. Three route groups, each with its own time budget
(examples past it return at once), 90 s in all: the OpenAI routes (60 s),
the /api management routes on a single-box manager (18 s) and /v2 (12 s).
Every 4xx must be an error body: OpenAI's (``{"error": {"message", ...}}``)
on the OpenAI and /api routes, KServe's (``{"error": "..."}``) on /v2.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from edgemesh.gateway import create_app  # noqa: E402
from edgemesh.limits import ServingLimits  # noqa: E402
from edgemesh.local import LocalOptions, load_service  # noqa: E402
from edgemesh.models import ModelSource  # noqa: E402

BUDGETS_S = {"openai": 60.0, "api": 18.0, "v2": 12.0}
"""Seconds of fuzzing per route group; 90 s in all."""
_started: dict[str, float] = {}
_seen: dict[tuple[str, str, int], int] = {}


def _group(path: str) -> str:
    return "api" if path.startswith("/api/") else "v2" if path.startswith("/v2") else "openai"


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.fixtures.tiny_models import convert_tiny_model

    pkg = convert_tiny_model("qwen2", tmp_path_factory.mktemp("fuzz"), precisions=("fp32",))
    svc = load_service(
        ModelSource("tiny", Path(pkg), "package"),
        LocalOptions(
            ServingLimits(threads=1, context_length=96, max_sequences=4, max_queue=64),
            backend="onnxruntime",
            precision="fp32",
        ),
    )
    from edgemesh.gateway.manager import LocalManager
    from edgemesh.graph.build import build_package
    from edgemesh.graph.service import GraphServeOptions, load_graph_service

    graph_dir = tmp_path_factory.mktemp("fuzz-graph") / "cls"
    build_package("tests.graph_models:classifier", graph_dir)
    graph = load_graph_service(
        graph_dir, GraphServeOptions(backend="onnxruntime", precision="fp32", threads=1)
    )
    manager = LocalManager(state_dir=tmp_path_factory.mktemp("fuzz-state"))
    yield create_app([svc], graphs=[graph], manager=manager)
    svc.close()
    graph.close()


@pytest.fixture(scope="module")
def api_schema(tiny_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", tiny_app)


# The OpenAI routes, the /api management routes (on a single-box manager:
# drain/remove are refused, deploy takes only real package folders) and /v2.
# Not the dashboard's page and its static files.
schema = schemathesis.pytest.from_fixture("api_schema").include(
    path_regex=r"^/(v1/|v2|api/|tokenize|detokenize|tokenizer_info|metrics|health)"
)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_generated_request_gets_a_5xx(case: Any) -> None:
    group = _group(case.path)
    started = _started.setdefault(group, time.monotonic())
    if time.monotonic() - started > BUDGETS_S[group]:
        return
    response = case.call()
    key = (case.method, case.path, response.status_code)
    _seen[key] = _seen.get(key, 0) + 1
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if 400 <= response.status_code < 500 and response.content:
        error = response.json()["error"]
        # /v2's own errors are KServe's strings; the framework's 404/405 there are OpenAI's.
        if group == "v2" and isinstance(error, str):
            assert error, response.text
        else:
            assert error["message"] and error["type"], response.text
    elif 400 <= response.status_code < 500:  # KServe's readiness answers by status alone
        assert case.path.endswith("/ready"), case.as_curl_command()


def test_the_fuzzer_reached_the_model_and_the_validators() -> None:
    """The run above is not vacuous: generated bodies were served (200) and refused (4xx)."""
    if not _seen:
        pytest.skip("the fuzz test did not run in this session")
    served = {p for (m, p, st) in _seen if m == "POST" and st == 200}
    refused = {p for (m, p, st) in _seen if m == "POST" and 400 <= st < 500}
    assert {"/v1/completions", "/v1/chat/completions"} <= served, _seen
    assert {"/v1/completions", "/v1/chat/completions"} <= refused, _seen
    assert {"/api/plan", "/api/models", "/v2/models/{m}/infer"} <= refused, _seen
    got = {p for (m, p, st) in _seen if m == "GET" and st == 200}
    assert {"/api/overview", "/api/boxes", "/v2/models/{m}"} <= got, _seen


def _infer(shape: str, datatype: str, rest: str) -> tuple[str, bytes]:
    """An infer request of one input, written by hand (the fuzzer's bodies are well typed)."""
    tensor = f'{{"name": "input", "shape": {shape}, "datatype": "{datatype}", {rest}}}'
    return "/v2/models/cls/infer", f'{{"inputs": [{tensor}]}}'.encode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/plan", b"\xff\xfe"),
        ("/api/models", b"\x00\x00"),
        ("/api/models/tiny/replan", b"[1, 2"),
        _infer("[1e400]", "FP32", '"data": [1]'),
        _infer("[1]", "INT8", '"data": [1000]'),
        _infer("[1]", "FP32", '"parameters": [1]'),
        _infer("[1]", "FP32", '"parameters": {"binary_data_size": "x"}'),
        ("/v2/models/cls/infer", b'{"inputs": [], "parameters": [1]}'),
        ("/v2/models/cls/infer", b'{"inputs": [], "outputs": 5}'),
        ("/v2/models/cls/infer", b'{"inputs": [], "outputs": [{"name": "o", "parameters": "x"}]}'),
    ],
)
def test_bodies_that_were_500s_are_400s(tiny_app: Any, path: str, body: bytes) -> None:
    from starlette.testclient import TestClient

    # No `with`: the app's lifespan (its monitoring thread) stays the fuzz run's.
    http = TestClient(tiny_app, raise_server_exceptions=False)
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]
