"""Structured output on every ONNX-path backend (the llama.cpp path is in
test_gateway_openai.py, the mesh in test_gateway_mesh.py): the mask is applied
to the logits in the pick, so no backend knows about grammars. A tiny
converted model; its chat template is a tool-aware one given by file, so the
tools are rendered by the template itself."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest

from edgemesh.backends import registry
from edgemesh.gateway import create_app
from edgemesh.limits import ServingLimits
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
            ServingLimits(threads=1, context_length=512, max_sequences=4),
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


def _reference_embedding(package: Path, ids: list[int]) -> np.ndarray:
    """The torch source model's last hidden state (after its final norm),
    mean-pooled and L2-normalised: what /v1/embeddings states it returns."""
    import torch
    import transformers

    from tests.fixtures.tiny_models import hf_model_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_model_dir(package), dtype=torch.float32
    )
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]  # [S, H]
    vec = hidden.mean(dim=0).numpy()  # [H]
    return vec / np.linalg.norm(vec)


def test_embeddings_of_a_package_match_the_torch_model(
    client: openai.OpenAI, package: Path
) -> None:
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(package)
    hidden = pkg.manifest.hidden_size
    tok = pkg.tokenizer()
    texts = ["the cat sat on the mat", "quantum flux", "a"]
    ids = [tok.encode(t) for t in texts]
    out = client.embeddings.create(model="tiny", input=texts)
    assert [d.index for d in out.data] == [0, 1, 2]
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    got = [np.array(d.embedding, np.float32) for d in out.data]
    for vec, seq in zip(got, ids, strict=True):
        assert vec.shape == (hidden,)
        np.testing.assert_allclose(vec, _reference_embedding(package, seq), atol=1e-4)
    # Deterministic, and the same whether sent alone, as token ids or in a list.
    again = client.embeddings.create(model="tiny", input=ids[1])
    np.testing.assert_allclose(np.array(again.data[0].embedding), got[1], atol=1e-6)
    # base64 carries the same float32 values; `dimensions` truncates and re-normalises.
    b64 = client.embeddings.create(model="tiny", input=texts[0], encoding_format="base64")
    raw = np.frombuffer(base64.b64decode(b64.data[0].embedding), "<f4")  # type: ignore[arg-type]
    np.testing.assert_array_equal(raw, got[0])
    short = client.embeddings.create(model="tiny", input=texts[0], dimensions=16)
    want = got[0][:16] / np.linalg.norm(got[0][:16])
    np.testing.assert_allclose(np.array(short.data[0].embedding), want, atol=1e-6)


def test_embeddings_while_every_slot_generates(client: openai.OpenAI) -> None:
    """A pooled pass takes no KV slot: embeddings are served while all four
    sequence slots are busy generating, and generation is unharmed."""
    import concurrent.futures as cf

    def generate() -> str | None:
        out = client.completions.create(
            model="tiny", prompt="hi", max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].finish_reason

    idle = client.embeddings.create(model="tiny", input="the cat").data[0].embedding
    with cf.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(generate) for _ in range(4)]
        busy = [client.embeddings.create(model="tiny", input="the cat") for _ in range(3)]
        reasons = [s.result() for s in streams]
    assert reasons == ["length"] * 4
    for out in busy:
        assert out.data[0].embedding == pytest.approx(idle, abs=1e-5)


def test_a_seeded_request_alone_repeats_exactly(client: openai.OpenAI) -> None:
    """What `seed` guarantees (docs/GATEWAY.md): the same request with the same
    seed, running alone, gives the same text and the same logprobs, bit for bit
    (with other requests in the batch it is best effort, as OpenAI's)."""
    kw = {
        "model": "tiny",
        "prompt": "the cat",
        "max_tokens": 32,
        "temperature": 1.0,
        "seed": 7,
        "logprobs": 0,
        "n": 2,
        "extra_body": {"ignore_eos": True},
    }
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    for a, b in zip(first.choices, again.choices, strict=True):
        assert a.text == b.text
        assert a.logprobs.token_logprobs == b.logprobs.token_logprobs
    assert first.choices[0].text != first.choices[1].text  # sample j uses seed + j


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pooled_pass_through_cut_ranges_takes_no_slot(package: Path, backend: str) -> None:
    """The pooled pass on the backends themselves: through two ranges it equals
    the torch reference as through one, it runs while the only sequence slot
    is taken, and it leaves no cache behind on either range."""
    from edgemesh.backends.base import BackendOptions, SeqInput
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.pipeline import load_pipeline

    tok = open_package(package).tokenizer()
    ids = np.asarray(tok.encode("the cat sat on the mat"), np.int64)
    want = _reference_embedding(package, [int(t) for t in ids])
    options = BackendOptions(threads=1, context_length=256, max_sequences=1)
    pipe = load_pipeline(package, [1], "fp32", backend=backend, options=options)
    try:
        assert pipe.backends[-1].can_pool
        pipe.forward([SeqInput(5, 0, tokens=ids[:3])])  # the one slot, on both ranges
        (pooled,) = pipe.forward([SeqInput(-1, 0, tokens=ids, logits="pooled")])
        assert pooled.shape == (1, want.shape[0])
        np.testing.assert_allclose(pooled[0] / np.linalg.norm(pooled[0]), want, atol=1e-4)
        assert [sorted(b._seqs) for b in pipe.backends] == [[5], [5]]
        # The live sequence goes on where it was: its cache was not touched.
        pipe.forward([SeqInput(5, 3, tokens=ids[3:4])])
    finally:
        pipe.close()


def _package_without_hidden_norm(package: Path, out: Path) -> Path:
    """A copy of ``package`` as converted before the head exported hidden_norm."""
    import hashlib
    import json
    import shutil

    import onnx

    shutil.copytree(package, out)
    head = out / "fp32" / "head.onnx"
    model = onnx.load(str(head), load_external_data=False)
    kept = [o for o in model.graph.output if o.name != "hidden_norm"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    head.write_bytes(model.SerializeToString())
    manifest = json.loads((out / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        if art["path"] == "fp32/head.onnx":
            art["sha256"] = hashlib.sha256(head.read_bytes()).hexdigest()
            art["bytes"] = head.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_package_without_hidden_norm_says_to_reconvert(package: Path, tmp_path: Path) -> None:
    from edgemesh.backends.base import BackendOptions, SeqInput
    from edgemesh.errors import RequestError
    from edgemesh.limits import ServingLimits
    from edgemesh.sharding.pipeline import load_pipeline
    from tests.conftest import LiveServer

    old = _package_without_hidden_norm(package, tmp_path / "old")
    options = BackendOptions(threads=1, context_length=128, max_sequences=2)
    pipe = load_pipeline(old, [1], "fp32", backend="onnxruntime", options=options)
    try:
        assert not pipe.backends[-1].can_pool
        with pytest.raises(RequestError, match="re-convert") as err:
            pipe.forward([SeqInput(-1, 0, tokens=np.arange(4, dtype=np.int64), logits="pooled")])
        assert err.value.code == "embeddings_unsupported"
        assert [b._seqs for b in pipe.backends] == [{}, {}]  # nothing cached on either range
    finally:
        pipe.close()
    svc = load_service(
        ModelSource("old", old, "package"),
        LocalOptions(
            ServingLimits(threads=1, context_length=128, max_sequences=2),
            backend="onnxruntime",
            precision="fp32",
        ),
    )
    try:
        with LiveServer(create_app([svc])) as live:
            c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError) as bad:
                c.embeddings.create(model="old", input="the cat")
            assert bad.value.code == "embeddings_unsupported"
            assert c.completions.create(model="old", prompt="hi", max_tokens=3).choices[0].text
    finally:
        svc.close()
