"""Schemathesis fuzzes the gateway from its own OpenAPI schema: no input may get a 5xx.

The app runs a tiny converted model (onnxruntime, fp32, a 96-token context)
so generated requests that pass validation finish in milliseconds; the
whole run is bounded to a minute (examples past the budget return at once).
Every 4xx must be an OpenAI error body.
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
from edgemesh.local import LocalOptions, load_service  # noqa: E402
from edgemesh.models import ModelSource  # noqa: E402

BUDGET_S = 60.0
_started: list[float] = []
_seen: dict[tuple[str, str, int], int] = {}


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.fixtures.tiny_models import convert_tiny_model

    pkg = convert_tiny_model("qwen2", tmp_path_factory.mktemp("fuzz"), precisions=("fp32",))
    svc = load_service(
        ModelSource("tiny", Path(pkg), "package"),
        LocalOptions(
            threads=1,
            context_length=96,
            max_sequences=4,
            max_queue=64,
            backend="onnxruntime",
            precision="fp32",
        ),
    )
    yield create_app([svc])
    svc.close()


@pytest.fixture(scope="module")
def api_schema(tiny_app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", tiny_app)


# The OpenAI gateway's own routes; the /api management routes act on the box
# (drain, deploy) and have their own tests.
schema = schemathesis.pytest.from_fixture("api_schema").include(
    path_regex=r"^/(v1/|tokenize|detokenize|tokenizer_info|metrics|health)"
)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_generated_request_gets_a_5xx(case: Any) -> None:
    if not _started:
        _started.append(time.monotonic())
    if time.monotonic() - _started[0] > BUDGET_S:
        return
    response = case.call()
    key = (case.method, case.path, response.status_code)
    _seen[key] = _seen.get(key, 0) + 1
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text


def test_the_fuzzer_reached_the_model_and_the_validators() -> None:
    """The run above is not vacuous: generated bodies were served (200) and refused (4xx)."""
    if not _seen:
        pytest.skip("the fuzz test did not run in this session")
    served = {p for (m, p, st) in _seen if m == "POST" and st == 200}
    refused = {p for (m, p, st) in _seen if m == "POST" and 400 <= st < 500}
    assert {"/v1/completions", "/v1/chat/completions"} <= served, _seen
    assert {"/v1/completions", "/v1/chat/completions"} <= refused, _seen
