"""Issue-16 features through the mesh path: the gateway over a ``RayPipeline``
of two stage actors (boxes ``a`` and ``b`` on one local Ray node), driven by
the openai client. The grammar's mask and the logprobs are computed where the
logits are, on the last stage: JSON-schema output, tool calls and echo
logprobs must be as valid as on one box, and /metrics shows each stage's
step time and the hops between them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from edgemesh.engine import Engine, EngineConfig
from edgemesh.gateway import create_app
from edgemesh.gateway.service import ModelService
from edgemesh.router.placement import StaticPlacer
from edgemesh.router.stage import StageSpec
from tests.fixtures.tiny_models import shared_tiny_package

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["word", "n"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"key": {"enum": ["a", "b", "c"]}},
            "required": ["key"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def mesh_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelService]:
    ray = pytest.importorskip("ray")
    from edgemesh.gateway.embeddings import pipeline_embedder
    from edgemesh.mesh.deployment_record import PackageRef
    from edgemesh.router.ray_pipeline import RayPipeline
    from edgemesh.sharding.package.folder import open_package

    package = shared_tiny_package("qwen3")  # 3 layers
    tmp = tmp_path_factory.mktemp("mesh")
    ray.init(
        num_cpus=2,
        resources={"box:a": 1.0, "box:b": 1.0},
        include_dashboard=False,
        _temp_dir=str(tmp / "ray"),
        logging_level="warning",
    )
    specs = [
        StageSpec(
            index=i,
            box=box,
            start=a,
            stop=b,
            num_layers=3,
            package_dir=str(package),
            cache_root=str(tmp / f"cache-{box}"),
        )
        for i, (box, a, b) in enumerate([("a", 0, 1), ("b", 1, 3)])
    ]
    try:
        pipe = RayPipeline(StaticPlacer(specs), PackageRef.from_folder(package))
        tok = open_package(package).tokenizer()
        engine = Engine(pipe, tok, EngineConfig(context_length=512, max_sequences=8))
        hidden = open_package(package).manifest.hidden_size
        svc = ModelService(
            "tiny-mesh",
            engine,
            tok,
            info={"stages": pipe.describe()},
            embedder_factory=lambda: pipeline_embedder(pipe, hidden, 512),
        )
        yield svc
        svc.close()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(mesh_service: ModelService) -> Iterator[tuple[openai.OpenAI, str]]:
    from tests.conftest import LiveServer

    with LiveServer(create_app([mesh_service])) as live:
        yield openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0), live.url


def test_structured_output_and_logprobs_through_two_stages(
    client: tuple[openai.OpenAI, str],
) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    c, url = client
    out = c.chat.completions.create(
        model="tiny-mesh",
        messages=[{"role": "user", "content": "JSON please"}],
        # SCHEMA's longest reply: an 8-character word of \uXXXX escapes (48 bytes)
        # plus 21 bytes of the rest; a token is at least a byte, so 80 always fits.
        max_tokens=80,
        temperature=1.5,
        n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    calls = c.chat.completions.create(
        model="tiny-mesh",
        messages=[{"role": "user", "content": "look up b"}],
        tools=[TOOL],
        tool_choice="required",
        # One call is ~60 bytes; at temperature 1 the model may call again and again
        # ("required" is one or more calls): the grammar ends the reply at a call's
        # end while 150 tokens still hold one (grammar.Constraint), never mid-call.
        max_tokens=150,
        temperature=1.0,
    )
    assert calls.choices[0].finish_reason == "tool_calls"
    for call in calls.choices[0].message.tool_calls:
        assert call.function.name == "lookup"
        jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    echo = c.completions.create(
        model="tiny-mesh", prompt="the cat sat", max_tokens=2, temperature=0, logprobs=2, echo=True
    )
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    stage_s = {
        s.labels["box"]: s.value
        for s in families["edgemesh_stage_step_seconds"].samples
        if s.name.endswith("_total")
    }
    assert set(stage_s) == {"a", "b"} and all(v > 0 for v in stage_s.values())
    hops = {
        s.labels["hop"]: s.value
        for s in families["edgemesh_hops"].samples
        if s.name.endswith("_total")
    }
    assert hops["0->1"] > 0 and hops["gateway->0"] > 0


def test_embeddings_through_two_stages_match_the_torch_model(
    client: tuple[openai.OpenAI, str], mesh_service: ModelService
) -> None:
    """The first stage runs the pooled pass through its layer, the last pools
    its final norm's rows: the vector is the torch model's mean-pooled last
    hidden state (normalised), and the pass leaves no sequence behind."""
    import numpy as np
    import torch
    import transformers

    from tests.fixtures.tiny_models import hf_model_dir

    c, _ = client
    ids = mesh_service.tokenizer.encode("the cat sat on the mat")
    out = c.embeddings.create(model="tiny-mesh", input=[ids, ids[:2]])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_model_dir(shared_tiny_package("qwen3")), dtype=torch.float32
    )
    for data, seq in zip(out.data, [ids, ids[:2]], strict=True):
        with torch.no_grad():
            hidden = model.model(torch.tensor([seq])).last_hidden_state[0].mean(dim=0).numpy()
        np.testing.assert_allclose(
            np.array(data.embedding), hidden / np.linalg.norm(hidden), atol=1e-4
        )
    again = c.embeddings.create(model="tiny-mesh", input=ids)
    assert again.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-6)
    pipe = mesh_service.engine.pipeline
    assert not any(sid < 0 for sid in pipe._history)  # pooled passes are not replayed
