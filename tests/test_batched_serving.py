"""Batched decode behind the real gateway and engine, on an ONNX package.

The tiny llama package (tests/fixtures) served whole on onnxruntime at fp32:

* concurrent greedy requests through the engine give each request's tokens
  alone, and the steps really were batched (the backend ran fewer graph
  runs than tokens);
* with every KV slot taken and no queue, one more request gets HTTP 429
  with ``Retry-After``;
* a client that drops its stream mid-batch frees its slot and its cache
  rows: the backend forgets the sequence and the next request runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgemesh.gateway import create_app
from edgemesh.gateway.service import ModelService
from edgemesh.limits import ServingLimits
from edgemesh.local import LocalOptions, load_service
from edgemesh.models import ModelSource
from edgemesh.sampling import SamplingParams
from tests.fixtures.backend_models import CONFORMANCE_ARCH
from tests.fixtures.tiny_models import shared_tiny_package


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package(CONFORMANCE_ARCH)


def _service(package: Path, sequences: int, queue: int, context: int = 256) -> ModelService:
    return load_service(
        ModelSource("tiny", package, "package"),
        LocalOptions(
            ServingLimits(
                threads=1,
                context_length=context,
                max_sequences=sequences,
                max_queue=queue,
            ),
            backend="onnxruntime",
            precision="fp32",
        ),
    )


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def _tokens(service: ModelService, prompt: list[int], tokens: int) -> list[int]:
    events = list(service.engine.submit(prompt, _greedy(tokens)))
    assert events[-1].finish_reason == "length", events[-1]
    return [e.token_id for e in events if e.token_id is not None]


def test_concurrent_requests_match_each_alone_and_share_steps(package: Path) -> None:
    prompts = [[5, 17, 40], [9, 3, 11, 60, 61, 62, 7], [100], [23, 24, 25, 26, 27, 28, 29, 30, 31]]
    lengths = [12, 6, 9, 4]  # streams leave the batch at different steps
    service = _service(package, sequences=4, queue=4)
    try:
        alone = [_tokens(service, p, n) for p, n in zip(prompts, lengths, strict=True)]
        backend = service.engine.pipeline.backends[0]
        runs_before = backend.graph_runs
        results: dict[int, list[int]] = {}
        start = threading.Barrier(len(prompts))

        def one(i: int) -> None:
            start.wait()
            results[i] = _tokens(service, prompts[i], lengths[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(len(prompts))] == alone
        # One-by-one decoding would run the graph once per token (plus the prompts).
        assert backend.graph_runs - runs_before < sum(lengths)
        assert service.engine.stats.to_dict()["mean_batch"] > 1
        assert not backend._seqs and backend.kv_bytes() == 0
    finally:
        service.close()


def _stream(live_url: str, body: dict) -> Iterator[str]:
    with httpx.stream("POST", live_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        yield from r.iter_lines()


def test_full_kv_gets_429_and_a_dropped_client_frees_its_slot(package: Path) -> None:
    from tests.conftest import LiveServer

    # Long streams (the tiny model's whole context), so both are still running
    # when the third request and the disconnect come.
    service = _service(package, sequences=2, queue=0, context=512)
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 480, "stream": True,
            "temperature": 0}  # fmt: skip
    backend = service.engine.pipeline.backends[0]
    try:
        with LiveServer(create_app([service])) as live:
            keep = _stream(live.url, body)
            drop = _stream(live.url, body)
            assert next(keep).startswith("data: ") and next(drop).startswith("data: ")
            assert service.engine.load["active"] == 2
            full = httpx.post(live.url + "/v1/completions", json={**body, "stream": False},
                              timeout=30)  # fmt: skip
            assert full.status_code == 429, full.text
            assert int(full.headers["retry-after"]) >= 1
            drop.close()  # the client goes away mid-batch
            deadline = time.monotonic() + 20
            while service.engine.load["active"] > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert service.engine.load == {"active": 1, "waiting": 0}
            assert len(backend._seqs) <= 1  # its cache rows are gone, the other's stay
            short = {**body, "stream": False, "max_tokens": 3}
            after = httpx.post(live.url + "/v1/completions", json=short, timeout=60)
            assert after.status_code == 200, after.text
            keep.close()
    finally:
        service.close()
