"""`edgemesh.Client` / `edgemesh.AsyncClient` against a real gateway.

One uvicorn gateway (`create_app`, as `edgemesh serve` builds it) with an API
key serves a tiny converted LLM over /v1, a tiny graph classifier over /v2
(H5's Open Inference Protocol routes) and the management API over /api
(H2's, with this box as the site). The SDK's answers are checked against the
official `openai` client and against onnxruntime run directly; errors
against the classes the server raised.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import edgemesh
from edgemesh import errors as em
from edgemesh.sdk import (
    AsyncClient,
    Client,
    GatewayError,
    GatewayUnreachableError,
    JobFailedError,
)
from edgemesh.sdk.errors import error_classes, error_from_response
from tests.conftest import LiveServer
from tests.fixtures.tiny_models import shared_tiny_package

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")
openai = pytest.importorskip("openai", reason="the answers are compared with the openai client")

KEY = "sdk-test-key"
DOCS_KEY = "my-key"  # the key docs/SDK.md's examples use
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"
GRAPH = "cls"


@pytest.fixture(scope="module")
def graph_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(
        "torch", reason="builds the graph model with torch (edgemesh[import-torch])"
    )
    from edgemesh.graph.build import build_package

    out = tmp_path_factory.mktemp("sdk-graph") / GRAPH
    build_package("tests.graph_models:classifier", out)
    return out


@pytest.fixture(scope="module")
def gateway(graph_package: Path) -> Iterator[str]:
    from edgemesh.gateway import create_app
    from edgemesh.graph.service import GraphServeOptions, load_graph_service
    from edgemesh.limits import ServingLimits
    from edgemesh.local import LocalOptions, load_service
    from edgemesh.models import ModelSource

    llm = load_service(
        ModelSource(MODEL, shared_tiny_package("qwen3"), "package"),
        LocalOptions(
            ServingLimits(threads=1, context_length=256, max_sequences=2),
            precision="fp32",
        ),
    )
    graph = load_graph_service(
        graph_package, GraphServeOptions(backend="onnxruntime", precision="fp32", threads=1)
    )
    try:
        with LiveServer(create_app([llm], api_keys=[KEY, DOCS_KEY], graphs=[graph])) as live:
            yield live.url
    finally:
        llm.close()
        graph.close()


@pytest.fixture
def client(gateway: str) -> Iterator[Client]:
    with Client(gateway, api_key=KEY) as c:
        yield c


def test_import_edgemesh_stays_light_and_exports_the_clients() -> None:
    code = (
        "import sys, json, edgemesh; before = [m for m in ('httpx', 'edgemesh.sdk', 'numpy') "
        "if m in sys.modules]; c = edgemesh.Client; a = edgemesh.AsyncClient; "
        "print(json.dumps([before, c.__module__, a.__name__, 'httpx' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # httpx loads when a client is made, not even when the class is looked up.
    assert json.loads(out.stdout) == [[], "edgemesh.sdk.client", "AsyncClient", False]
    assert edgemesh.Client is Client and edgemesh.AsyncClient is AsyncClient
    with pytest.raises(AttributeError):
        edgemesh.NoSuchThing  # noqa: B018


def test_the_api_key_never_shows(gateway: str) -> None:
    with Client(gateway, api_key=KEY) as c:
        assert KEY not in repr(c) and KEY not in repr(c.config) and KEY not in str(c.config)
        assert "***" in repr(c)


def test_models_and_completions_match_the_openai_client(client: Client, gateway: str) -> None:
    assert [m.id for m in client.models()] == [MODEL]
    reference = openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0)
    want = reference.completions.create(
        model=MODEL, prompt="The lighthouse", max_tokens=8, temperature=0
    )
    got = client.complete(MODEL, "The lighthouse", max_tokens=8, temperature=0)
    assert got.text == want.choices[0].text and got.finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 8

    chat_want = reference.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    chat = client.chat(MODEL, "Hello", max_tokens=8, temperature=0)
    assert chat.text == chat_want.choices[0].message.content
    assert chat.usage is not None and chat.usage.prompt_tokens == chat_want.usage.prompt_tokens


def test_streams_are_iterators_of_the_same_text(client: Client) -> None:
    whole = client.chat(MODEL, "Hello", max_tokens=10, temperature=0)
    chunks = list(client.chat_stream(MODEL, "Hello", max_tokens=10, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert any(c.finish_reason == "length" for c in chunks)
    done = client.complete(MODEL, "Bread is", max_tokens=6, temperature=0)
    parts = [c.text for c in client.complete_stream(MODEL, "Bread is", max_tokens=6, temperature=0)]
    assert "".join(parts) == done.text


def test_async_client_gives_the_same_answers(client: Client, gateway: str) -> None:
    want = client.chat(MODEL, "Hello", max_tokens=8, temperature=0).text
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    want_out = client.infer(GRAPH, {"input": x})["output"]

    async def run() -> tuple[str, str, list[str], np.ndarray, str]:
        async with AsyncClient(gateway, api_key=KEY) as a:
            models = [m.id for m in await a.models()]
            chat = await a.chat(MODEL, "Hello", max_tokens=8, temperature=0)
            streamed = [c.text async for c in a.chat_stream(MODEL, "Hello", max_tokens=8,
                                                            temperature=0)]  # fmt: skip
            out = (await a.infer(GRAPH, {"input": x}))["output"]
            status = await a.status()
            return chat.text, "".join(streamed), models, out, status.mode

    text, streamed, models, out, mode = asyncio.run(run())
    assert models == [MODEL] and text == want and streamed == want and mode == "single"
    np.testing.assert_array_equal(out, want_out)


def test_oip_infer_round_trips_numpy(client: Client, graph_package: Path) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(
        str(graph_package / "model.fp32.onnx"), providers=["CPUExecutionProvider"]
    )
    want = sess.run(None, {"input": x})[0]
    got = client.infer(GRAPH, {"input": x})
    assert list(got) == ["output"] and got["output"].dtype == np.float32
    np.testing.assert_allclose(got["output"], want, rtol=1e-5, atol=1e-6)
    assert client.infer(GRAPH, {"input": x}, outputs=["output"])["output"].shape == (3, 10)
    meta = client.graph_model(GRAPH)
    assert meta["inputs"][0]["name"] == "input"


def test_status_plan_deploy_and_undeploy_through_the_management_api(client: Client) -> None:
    status = client.status()
    assert status.mode == "single" and len(status.boxes) == 1
    assert status.boxes[0]["id"] == status.gateway_box
    package = str(shared_tiny_package("qwen3"))
    plan = client.plan(package)
    assert len(plan["stages"]) == 1 and plan["predicted_tokens_per_s"] > 0

    job = client.deploy(package, name="tiny2", plan=plan)
    assert job.state == "done" and job.kind == "deploy" and job.target == "tiny2"
    assert sorted(m.id for m in client.models()) == ["tiny", "tiny2"]
    assert client.chat("tiny2", "Hello", max_tokens=4, temperature=0).usage.completion_tokens == 4
    assert client.job(job.id).state == "done"

    with pytest.raises(em.ConflictError, match="already served"):
        client.deploy(package, name="tiny2")
    gone = client.undeploy("tiny2")
    assert gone.state == "done"
    assert [m.id for m in client.models()] == ["tiny"]
    with pytest.raises(em.NotFoundError):
        client.undeploy("tiny2")

    # A job that fails raises (the job's own class when the gateway names it).
    two = {**plan, "stages": [plan["stages"][0], plan["stages"][0]]}
    with pytest.raises(em.EdgemeshError) as err:
        client.deploy(package, name="tiny3", plan=two)
    assert type(err.value) is em.ConflictError and not isinstance(err.value, JobFailedError)
    assert err.value.job.state == "failed" and err.value.job.error == "ConflictError"
    assert "2 stages" in str(err.value)


def test_errors_come_back_as_the_server_raised_them(client: Client, gateway: str) -> None:
    with pytest.raises(em.NotFoundError, match="does not exist") as err:
        client.chat("no-such-model", "Hi")
    assert err.value.code == "model_not_found" and err.value.status == 404
    with pytest.raises(em.ContextOverflowError):
        client.complete(MODEL, "Bread " * 200, max_tokens=200)
    with pytest.raises(em.RequestError) as bad:
        client.chat(MODEL, "Hi", temperature=-3)
    assert type(bad.value) is em.RequestError and bad.value.param
    with pytest.raises(em.TensorError):
        client.infer(GRAPH, {"input": np.zeros((1, 3, 32, 32), np.float64)})
    with pytest.raises(em.NotFoundError):
        client.infer("no-graph", {"input": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(em.NotFoundError) as pkg:
        client.plan("/nowhere/at/all")
    assert pkg.value.code == "package_not_found"
    with Client(gateway, api_key="wrong") as intruder:
        with pytest.raises(em.AuthError):
            intruder.models()
        with pytest.raises(em.AuthError):
            list(intruder.chat_stream(MODEL, "Hi"))
    with Client("http://127.0.0.1:9") as nowhere, pytest.raises(GatewayUnreachableError):
        nowhere.status()


def _instance(cls: type[em.EdgemeshError]) -> em.EdgemeshError:
    """One instance of each edgemesh error class, whatever its signature."""
    special = {
        em.MissingExtraError: lambda: em.MissingExtraError("ray", "mesh"),
        em.CorruptArtifactError: lambda: em.CorruptArtifactError("a.onnx", "truncated"),
        em.UnsupportedOpError: lambda: em.UnsupportedOpError("Loop", 17, "the exporter"),
        em.MeshSettlingError: lambda: em.MeshSettlingError("settling", settling=["b: joining"]),
        em.OverloadedError: lambda: em.OverloadedError("queue full", retry_after_s=3),
    }
    return special.get(cls, lambda: cls("something went wrong"))()


def test_every_error_class_the_gateway_can_emit_is_mapped_back() -> None:
    """Each edgemesh.errors class, answered by the gateway's own handlers (/v1 and
    /api: errors.edgemesh_response; /v2: oip.oip_error), comes back as that class
    (on /v2, whose body has no code, as the class its status stands for)."""
    from edgemesh.gateway.errors import edgemesh_response
    from edgemesh.gateway.oip import oip_error
    from edgemesh.sdk.errors import OIP_STATUS

    classes = error_classes()
    assert len(classes) >= 25 and "MeshSettlingError" in classes
    for name, cls in sorted(classes.items()):
        exc = _instance(cls)
        resp = edgemesh_response(exc)
        got = error_from_response(resp.status_code, bytes(resp.body), resp.headers)
        assert type(got) is cls, (name, resp.status_code, resp.body)
        assert str(exc) in str(got)
        if isinstance(exc, em.OverloadedError):
            assert got.retry_after_s == 3  # type: ignore[attr-defined]
        resp = oip_error(exc)
        got = error_from_response(resp.status_code, bytes(resp.body), resp.headers)
        assert type(got) is OIP_STATUS.get(resp.status_code, em.RequestError), name
    # Answers that are no edgemesh error body.
    assert type(error_from_response(502, b"<html>bad gateway</html>")) is GatewayError
    assert type(error_from_response(418, b'{"error": {"message": "teapot"}}')) is em.RequestError


def test_an_error_inside_a_stream_raises_its_class() -> None:
    """The gateway's mid-stream error event (its own body builder), read by the client."""
    import httpx

    from edgemesh.gateway.errors import error_body

    events = [
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        error_body("box b2 lost mid-generation", 503, code="BoxLostError"),
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with Client("http://gateway.test", transport=httpx.MockTransport(handler)) as c:
        stream = c.chat_stream(MODEL, "Hi")
        assert next(stream).text == "Hel"
        with pytest.raises(em.BoxLostError, match="lost mid-generation"):
            next(stream)


def _doc_examples() -> list[str]:
    text = (ROOT / "docs" / "SDK.md").read_text()
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


def test_every_docs_example_runs_against_the_gateway(gateway: str, capsys) -> None:
    """docs/SDK.md's examples, as written, with the test server's URL and package."""
    examples = _doc_examples()
    assert len(examples) == 5
    package = str(shared_tiny_package("qwen3"))
    outputs = []
    for i, code in enumerate(examples):
        code = code.replace("http://127.0.0.1:8000", gateway).replace("./tiny-qwen3", package)
        exec(compile(code, f"docs/SDK.md example {i + 1}", "exec"), {"__name__": "__main__"})
        outputs.append(capsys.readouterr().out)
    chat, async_, graph, site, errors_ = outputs
    assert chat.startswith("['tiny']") and "length" in chat
    assert async_.strip() and "(1, 10)" in graph
    assert site.startswith("single [(") and "done" in site
    assert (
        "not served: model_not_found" in errors_ and "too long: context_length_exceeded" in errors_
    )


def test_config_reads_the_environment_once_and_checks_the_url(monkeypatch) -> None:
    from edgemesh.sdk import ClientConfig

    monkeypatch.setenv("EDGEMESH_URL", "http://head.local:8000/v1/")
    monkeypatch.setenv("EDGEMESH_API_KEY", "from-env")
    config = ClientConfig.resolve()
    assert config.base_url == "http://head.local:8000" and config.api_key == "from-env"
    assert config.headers() == {"Authorization": "Bearer from-env"}
    assert "from-env" not in repr(config)
    assert ClientConfig.resolve("http://other:9", api_key="").headers() == {}  # "" = no key
    with pytest.raises(em.ConfigError, match="not an http"):
        ClientConfig.resolve("head.local:8000")
