"""The engine on the real llama.cpp backend and the default model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgemesh.backends.base import SeqInput
from edgemesh.errors import ContextOverflowError, OverloadedError
from edgemesh.gateway.service import ModelService
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource
from edgemesh.sampling import SamplingParams

pytestmark = pytest.mark.llamacpp

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def service(default_gguf: Path) -> Iterator[ModelService]:
    svc = load_service(
        ModelSource("gemma", default_gguf, "gguf"),
        LocalOptions(ServingLimits(threads=2, context_length=512, max_sequences=4, max_queue=2)),
    )
    yield svc
    svc.close()


def _greedy_reference(service: ModelService, prompt: list[int], n: int) -> list[int]:
    """Plain greedy loop straight on the backend: the engine must match it."""
    backend = service.engine.pipeline.backends[0]
    out = backend.forward([SeqInput(999, 0, tokens=np.array(prompt))])
    ids, pos = [], len(prompt)
    for _ in range(n):
        tok = int(np.argmax(out[0][-1]))
        ids.append(tok)
        out = backend.forward([SeqInput(999, pos, tokens=np.array([tok]))])
        pos += 1
    backend.release(999)
    return ids


def _run(service: ModelService, prompt: list[int], params: SamplingParams) -> tuple[list, str]:
    events = list(service.engine.submit(prompt, params))
    ids = [e.token_id for e in events if e.token_id is not None]
    return ids, "".join(e.text for e in events) + f"|{events[-1].finish_reason}"


def test_greedy_generation_matches_a_plain_loop(service: ModelService) -> None:
    prompt = service.tokenizer.encode(PROMPT)
    ids, text = _run(service, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    assert ids == _greedy_reference(service, prompt, 12)
    assert "France" in text and text.endswith("|length")


def test_concurrent_sequences_are_batched_and_each_is_correct(service: ModelService) -> None:
    prompts = [
        service.tokenizer.encode(p)
        for p in (PROMPT, "One, two, three,", "The opposite of hot is", "Water boils at")
    ]
    expected = [_greedy_reference(service, p, 10) for p in prompts]
    results: list[list[int]] = [[] for _ in prompts]

    def go(i: int) -> None:
        results[i] = _run(service, prompts[i], SamplingParams(max_tokens=10, temperature=0.0))[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    assert max(service.engine.stats.batch_sizes) > 1  # they really shared forward calls


def test_stop_string_ends_generation_and_is_not_emitted(service: ModelService) -> None:
    prompt = service.tokenizer.encode("One, two, three, four,")
    _, text = _run(service, prompt, SamplingParams(max_tokens=30, temperature=0.0, stop=(" six",)))
    assert text.endswith("|stop") and "six" not in text and "five" in text


def test_seeded_sampling_is_repeatable(service: ModelService) -> None:
    prompt = service.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    assert _run(service, prompt, params)[0] == _run(service, prompt, params)[0]


def test_cancel_frees_the_slot(service: ModelService) -> None:
    prompt = service.tokenizer.encode(PROMPT)
    gen = service.engine.submit(prompt, SamplingParams(max_tokens=400, temperature=0.0))
    it = iter(gen)
    next(it)
    gen.cancel()
    for _event in it:
        pass
    backend = service.engine.pipeline.backends[0]
    assert service.engine.load == {"active": 0, "waiting": 0}
    assert not backend._slots  # the KV stream was released


def test_context_overflow_is_rejected(service: ModelService) -> None:
    with pytest.raises(ContextOverflowError, match="context is 512"):
        service.engine.submit([2] * 500, SamplingParams(max_tokens=20))


def test_queue_limit_raises_overloaded(service: ModelService) -> None:
    prompt = service.tokenizer.encode(PROMPT)
    gens = [
        service.engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0))
        for _ in range(4)
    ]  # fill the 4 active slots (admitted by the scheduler)
    try:
        with pytest.raises(OverloadedError):
            for _ in range(10):
                gens.append(service.engine.submit(prompt, SamplingParams(max_tokens=5)))
    finally:
        for g in gens:
            g.cancel()
