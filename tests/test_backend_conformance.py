"""One conformance suite for every registered backend, on each of its devices.

Parametrized over ``registry.all_backends()`` x ``Capabilities.devices``
(ids ``onnxruntime`` for the CPU, ``onnxruntime-cuda`` for the others): a
backend whose ``available()`` gives a reason shows up as skipped with that
reason (TensorRT without an NVIDIA GPU, RKNN off an aarch64 board), and so
does a device ``device_unavailable()`` refuses (``onnxruntime-cuda`` without
onnxruntime-gpu or an NVIDIA GPU). CUDA params carry ``pytest.mark.gpu``,
other non-CPU ones ``pytest.mark.hardware``. What a test requires is read
from ``Capabilities``, never from the backend's name:

* ``artifact_format == "onnx"``: the tiny llama package (4 layers) from
  ``tests/fixtures``; ``"gguf"``: the default model's GGUF.
* ``partial_ranges``: "the model as one shard == the model as two shards"
  and both against transformers' fp32 logits. Tolerances, as the largest
  absolute logit error relative to the reference's largest logit
  (``REL_TOL``): fp32 1e-5, fp16 1e-3, int8 5e-2, int4 0.5 (int4 of a
  random 64-wide model is coarse; the bound is 2x what was measured).
  One shard vs two shards of the same backend and precision: 1e-5.

KV release is measured two ways: the process RSS while filling sequences
again after releasing the first set must grow by less than half of what
the first fill grew, and (where the backend reports it) ``kv_bytes()``
falls to 0 and a refill reports the same bytes. Sequence lengths are chosen
so that a release that kept the cache would also run out of room. On a GPU
the cache lives in device memory the RSS does not show: there the check is
``kv_bytes()`` plus the slot count.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.errors import (
    ContextOverflowError,
    CorruptArtifactError,
    InferenceError,
    ModelNotFoundError,
)
from tests.fixtures.backend_models import (
    CONFORMANCE_ARCH,
    corrupt_copy,
    fp32_reference,
    truncated_copy,
)
from tests.fixtures.tiny_models import shared_tiny_package

REL_TOL = {"fp32": 1e-5, "fp16": 1e-3, "int8": 5e-2, "int4": 0.5}
SPLIT_TOL = 1e-5
# CUDA runs fp16 graphs in fp16 (the CPU runtimes upcast to fp32): 1.56e-3 was
# measured on an H100 for the tiny model, so the bound is 3x that.
DEVICE_REL_TOL = {"cuda": {"fp16": 5e-3}}


def _params() -> list[Any]:
    out = []
    for name, cls in registry.all_backends().items():
        reason = cls.available()
        for device in cls.capabilities.devices:
            marks: list[Any] = []
            why = reason
            if device != "cpu":
                marks.append(pytest.mark.gpu if device == "cuda" else pytest.mark.hardware)
                # Asked only when the runtime is there: the probe may import it.
                why = why or cls.device_unavailable(device)
            if why:
                marks.append(pytest.mark.skip(reason=f"{name} on {device}: {why}"))
            if cls.capabilities.artifact_format == "gguf":
                marks.append(pytest.mark.llamacpp)
            pid = name if device == "cpu" else f"{name}-{device}"
            out.append(pytest.param((name, device), marks=marks, id=pid))
    return out


@dataclass
class Subject:
    """A backend class and the model it is tested on."""

    cls: type
    model: Path
    num_layers: int
    precision: str
    cache: Path
    device: str = "cpu"

    @property
    def caps(self) -> Any:
        return self.cls.capabilities

    def open(self, start: int = 0, stop: int | None = None, precision: str | None = None,
             **opts: Any) -> Any:  # fmt: skip
        spec = ShardSpec(
            self.model,
            LayerRange(start, self.num_layers if stop is None else stop),
            self.num_layers,
            precision or self.precision,
        )
        base = {"threads": 1, "cache_dir": self.cache, "max_sequences": 4, "device": self.device}
        return self.cls(spec, BackendOptions(**(base | opts)))


@pytest.fixture(scope="session")
def onnx_package() -> Path:
    return shared_tiny_package(CONFORMANCE_ARCH)


@pytest.fixture(params=_params())
def subject(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Subject:
    name, device = request.param
    cls = registry.get(name)
    cache = tmp_path_factory.mktemp(f"cache-{name}-{device}")
    if cls.capabilities.artifact_format == "gguf":
        from edgemesh.backends.llamacpp import gguf_layer_count

        gguf = request.getfixturevalue("default_gguf")
        return Subject(cls, gguf, gguf_layer_count(gguf), "int4", cache, device)
    package = request.getfixturevalue("onnx_package")
    from edgemesh.sharding.package.folder import open_package

    precision = "fp32" if "fp32" in cls.capabilities.precisions else cls.capabilities.precisions[0]
    return Subject(cls, package, open_package(package).num_layers, precision, cache, device)


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 300, size=n).astype(np.int64)


def _rss() -> int:
    """Resident bytes after handing free heap pages back to the OS.

    Without the trim, memory freed by earlier tests in the same process sits
    in malloc's free lists and hides the growth this suite measures.
    """
    import psutil

    from edgemesh import heap

    gc.collect()
    heap.trim()
    return int(psutil.Process().memory_info().rss)


def test_registry_entry_is_complete(subject: Subject) -> None:
    cls = subject.cls
    assert cls.name in registry.names() and cls.extra and cls.module
    assert cls.capabilities.artifact_format in ("onnx", "gguf")
    assert cls.capabilities.precisions and cls.capabilities.max_batch >= 1


def test_output_shapes_and_dtypes(subject: Subject) -> None:
    """Two sequences of different lengths in one call; a decode step after."""
    with subject.open() as whole:
        a, b = whole.forward([SeqInput(1, 0, tokens=_ids(5)), SeqInput(2, 0, tokens=_ids(3, 1))])
        vocab = a.shape[1]
        assert a.shape == b.shape == (1, vocab) and a.dtype == b.dtype == np.float32
        assert np.isfinite(a).all()
        full = whole.forward([SeqInput(3, 0, tokens=_ids(4), logits="all")])[0]
        assert full.shape == (4, vocab) and full.dtype == np.float32
        step = whole.forward([SeqInput(1, 5, tokens=_ids(1, 2))])[0]
        assert step.shape == (1, vocab)
    if subject.caps.partial_ranges:
        with subject.open(0, 1) as first:
            hidden = first.forward([SeqInput(1, 0, tokens=_ids(5))])[0]
        assert hidden.ndim == 2 and hidden.shape[0] == 5 and hidden.dtype == np.float32


def _split_logits(subject: Subject, precision: str, ids: np.ndarray, cut: int) -> tuple:
    """(whole, split) logits ``[S, V]``: prefill of ids[:-3], then 3 decode steps."""
    outs = []
    for ranges in ([(0, subject.num_layers)], [(0, cut), (cut, subject.num_layers)]):
        shards = [subject.open(a, b, precision) for a, b in ranges]
        try:
            rows = []
            steps = [(0, ids[:-3])] + [(p, ids[p : p + 1]) for p in range(len(ids) - 3, len(ids))]
            for pos, piece in steps:
                x: np.ndarray = piece
                for k, shard in enumerate(shards):
                    item = (SeqInput(0, pos, tokens=x, logits="all") if k == 0
                            else SeqInput(0, pos, hidden=x, logits="all"))  # fmt: skip
                    x = shard.forward([item])[0]
                rows.append(x)
            outs.append(np.concatenate(rows))
        finally:
            for shard in shards:
                shard.close()
    return outs[0], outs[1]


def test_one_shard_equals_two_shards_near_fp32_reference(subject: Subject) -> None:
    if not subject.caps.partial_ranges:
        pytest.skip(f"{subject.cls.name} runs whole models only (Capabilities.partial_ranges)")
    from edgemesh.sharding.package.folder import open_package

    ids = _ids(12, 5)
    ref = fp32_reference(subject.model, ids)  # [12, V]
    scale = float(np.abs(ref).max())
    have = set(open_package(subject.model).precisions)
    for precision in [p for p in subject.caps.precisions if p in have]:
        whole, split = _split_logits(subject, precision, ids, subject.num_layers // 2)
        assert whole.shape == split.shape == ref.shape
        np.testing.assert_allclose(split, whole, atol=SPLIT_TOL * scale, rtol=0)
        err = float(np.abs(whole - ref).max()) / scale
        tol = {**REL_TOL, **DEVICE_REL_TOL.get(subject.device, {})}[precision]
        assert err < tol, f"{precision} on {subject.device}: relative error {err:.2e}"


def test_whole_model_ranks_like_itself_after_replay(subject: Subject) -> None:
    """Re-sending a sequence from position 0 (a replay) gives the first answer again."""
    ids = _ids(8, 9)
    with subject.open() as whole:
        first = whole.forward([SeqInput(4, 0, tokens=ids)])[0]
        whole.forward([SeqInput(4, 8, tokens=_ids(2, 3))])
        again = whole.forward([SeqInput(4, 0, tokens=ids)])[0]
    np.testing.assert_allclose(again, first, atol=1e-4 * float(np.abs(first).max()), rtol=0)


def test_release_frees_kv_memory(subject: Subject) -> None:
    gguf = subject.caps.artifact_format == "gguf"
    on_cpu = subject.device == "cpu"
    # llama.cpp: 4 streams of 256 cells; 160-token sequences cannot fit twice.
    # ONNX runtimes: 64 sequences x 448 tokens x 4 layers x 1 KiB = 28 MiB of cache, more
    # than the allocator keeps spare after loading.
    count, length, ctx = (4, 160, 256) if gguf else (64, 448, 512)
    with subject.open(max_sequences=count, context_length=ctx) as backend:
        reports = hasattr(backend, "kv_bytes")
        if not on_cpu:
            # Device memory is invisible to the RSS; only kv_bytes() can see it.
            assert reports, f"{subject.cls.name} on {subject.device} must report kv_bytes()"
        backend.forward([SeqInput(100, 0, tokens=_ids(length, 99))])  # warm-up allocations
        backend.release(100)
        base = _rss()
        for s in range(count):
            backend.forward([SeqInput(s, 0, tokens=_ids(length, s))])
        filled = _rss()
        reported = backend.kv_bytes() if reports else None
        with pytest.raises(InferenceError):  # every slot is taken
            backend.forward([SeqInput(count + 1, 0, tokens=_ids(2))])
        for s in range(count):
            backend.release(s)
        if reported is not None:
            assert reported > 0 and backend.kv_bytes() == 0
        for s in range(count, 2 * count):
            backend.forward([SeqInput(s, 0, tokens=_ids(length, s))])
        refilled = _rss()
        if reported is not None:  # the same lengths hold the same cache again, no more
            assert backend.kv_bytes() == reported
        with pytest.raises(InferenceError):  # released slots were reused, not added
            backend.forward([SeqInput(2 * count + 1, 0, tokens=_ids(2))])
    grew, regrew = filled - base, refilled - filled
    # llama.cpp allocates its cache up front; its check is the refill itself. A GPU
    # backend's cache is in device memory, which the RSS does not include: there the
    # checks are kv_bytes() and the slot count above.
    if not gguf and on_cpu:
        assert grew > 8 << 20, f"filling {count} sequences grew RSS by only {grew} bytes"
        assert regrew < grew / 2, f"refill after release grew {regrew} B (first fill {grew} B)"


def test_close_is_idempotent_and_final(subject: Subject) -> None:
    backend = subject.open()
    backend.forward([SeqInput(0, 0, tokens=_ids(3))])
    backend.close()
    backend.close()
    backend.release(0)  # unknown or closed: ignored
    with pytest.raises(InferenceError):
        backend.forward([SeqInput(0, 3, tokens=_ids(1))])


def test_a_refused_call_keeps_no_slot(subject: Subject) -> None:
    """A call refused for a position gap or its context takes no sequence slot and
    moves no sequence it names (every backend checks the whole call first,
    ``backends/admission.py``). With 2 slots: three refused new sequences, then
    two real ones must still fit; a refused mixed call leaves its valid row unrun."""
    with subject.open(max_sequences=2, context_length=64) as backend:
        for seq in (7, 8, 9):  # a refusal that kept its slot leaves no room below
            with pytest.raises(InferenceError, match="starts at position 5"):
                backend.forward([SeqInput(seq, 5, tokens=_ids(1))])
        with pytest.raises(ContextOverflowError):
            backend.forward([SeqInput(10, 0, tokens=_ids(65))])
        backend.forward([SeqInput(0, 0, tokens=_ids(4, 1))])
        backend.forward([SeqInput(1, 0, tokens=_ids(4, 2))])
        with pytest.raises(InferenceError, match="starts at position 9"):
            backend.forward([SeqInput(0, 9, tokens=_ids(1))])
        # Row 0 is fine, row 1 (a new sequence) has a gap: nothing runs, so
        # sequence 0 still holds 4 tokens and position 5 is still a gap.
        with pytest.raises(InferenceError, match="starts at position 3"):
            backend.forward([SeqInput(0, 4, tokens=_ids(1)), SeqInput(11, 3, tokens=_ids(1))])
        with pytest.raises(InferenceError, match="starts at position 5"):
            backend.forward([SeqInput(0, 5, tokens=_ids(1))])
        with pytest.raises(InferenceError, match="slots are busy"):  # both slots are 0 and 1
            backend.forward([SeqInput(12, 0, tokens=_ids(2))])
        backend.release(1)
        assert backend.forward([SeqInput(12, 0, tokens=_ids(2))])[0].shape[0] == 1
        backend.forward([SeqInput(0, 4, tokens=_ids(1))])  # sequence 0 goes on as it was


def test_corrupt_artifact_raises_typed_error(subject: Subject, tmp_path: Path) -> None:
    if subject.caps.artifact_format == "gguf":
        bad = truncated_copy(subject.model, tmp_path / "cut.gguf")
        junk = tmp_path / "junk.gguf"
        junk.write_bytes(b"NOPE" + bytes(64))
        for path in (bad, junk):
            with pytest.raises(CorruptArtifactError):
                subject.cls(ShardSpec(path, LayerRange(0, subject.num_layers), subject.num_layers))
        return
    bad = corrupt_copy(subject.model, tmp_path / "pkg", f"{subject.precision}/layer_001.onnx.data")
    spec = ShardSpec(bad, LayerRange(0, subject.num_layers), subject.num_layers, subject.precision)
    with pytest.raises(CorruptArtifactError) as info:
        subject.cls(spec, BackendOptions(threads=1, cache_dir=tmp_path / "cache"))
    assert "layer_001.onnx.data" in str(info.value)


def test_missing_model_raises_typed_error(subject: Subject, tmp_path: Path) -> None:
    missing = tmp_path / ("nothing.gguf" if subject.caps.artifact_format == "gguf" else "nothing")
    spec = ShardSpec(missing, LayerRange(0, subject.num_layers), subject.num_layers)
    with pytest.raises(ModelNotFoundError):
        subject.cls(spec, BackendOptions(threads=1, cache_dir=tmp_path))


def _greedy_alone(subject: Subject, prompt: np.ndarray, steps: int) -> tuple[list[int], list]:
    """One sequence on its own: prefill, then ``steps`` single decodes (greedy)."""
    with subject.open() as backend:
        logits = backend.forward([SeqInput(0, 0, tokens=prompt)])[0]
        tokens, rows = [int(np.argmax(logits[-1]))], [logits[-1]]
        for k in range(steps - 1):
            step = np.array([tokens[-1]], np.int64)
            logits = backend.forward([SeqInput(0, len(prompt) + k, tokens=step)])[0]
            tokens.append(int(np.argmax(logits[-1])))
            rows.append(logits[-1])
    return tokens, rows


def test_batched_decode_matches_one_by_one(subject: Subject) -> None:
    """Sequences of different lengths decoded together (joining and leaving
    mid-batch, prompts mixed with decode rows in one call) give the greedy
    tokens of the same sequences run one by one; a step of decode rows only
    is one run of the model, not one per sequence."""
    prompts = {1: _ids(3, 11), 2: _ids(9, 12), 3: _ids(5, 13), 4: _ids(12, 14), 5: _ids(2, 15)}
    # (sequence, step it joins, decode steps it runs); 2 leaves early, 4 and 5 join late.
    plan = {1: (0, 7), 2: (0, 3), 3: (2, 5), 4: (4, 4), 5: (5, 3)}
    got: dict[int, list[int]] = {s: [] for s in plan}
    rows: dict[int, list[np.ndarray]] = {s: [] for s in plan}
    runs_of_decode_only_steps = []
    with subject.open(max_sequences=5) as backend:
        for step in range(10):
            items, prompts_in_call = [], 0
            for sid, (joins, length) in plan.items():
                if step < joins or len(got[sid]) >= length:
                    continue
                if step == joins:
                    items.append(SeqInput(sid, 0, tokens=prompts[sid]))
                    prompts_in_call += 1
                else:
                    pos = len(prompts[sid]) + len(got[sid]) - 1
                    items.append(SeqInput(sid, pos, tokens=np.array([got[sid][-1]], np.int64)))
            if not items:
                break
            before = getattr(backend, "graph_runs", None)
            outs = backend.forward(items)
            if before is not None and prompts_in_call == 0 and len(items) > 1:
                runs_of_decode_only_steps.append(backend.graph_runs - before)
            for item, logits in zip(items, outs, strict=True):
                assert logits.shape == (1, logits.shape[1])
                got[item.seq_id].append(int(np.argmax(logits[-1])))
                rows[item.seq_id].append(logits[-1])
                if len(got[item.seq_id]) == plan[item.seq_id][1]:
                    backend.release(item.seq_id)  # leaves mid-batch
    for sid, (_, length) in plan.items():
        alone, alone_rows = _greedy_alone(subject, prompts[sid], length)
        assert got[sid] == alone, f"sequence {sid}: batched {got[sid]} != alone {alone}"
        if subject.precision == "fp32":
            scale = float(np.abs(np.stack(alone_rows)).max())
            np.testing.assert_allclose(np.stack(rows[sid]), np.stack(alone_rows),
                                       atol=1e-4 * scale, rtol=0)  # fmt: skip
    assert runs_of_decode_only_steps, "the plan has steps of decode rows only"
    assert all(n == 1 for n in runs_of_decode_only_steps), runs_of_decode_only_steps


def test_batched_decode_through_two_shards(subject: Subject) -> None:
    """Hidden states of a batch cross a cut: [0, k) + [k, n) batched equals the
    whole model batched, rows in a different order on the second shard."""
    if not subject.caps.partial_ranges:
        pytest.skip(f"{subject.cls.name} runs whole models only (Capabilities.partial_ranges)")
    cut = subject.num_layers // 2
    prompts = [_ids(4, 21), _ids(7, 22), _ids(2, 23)]
    with subject.open() as whole, subject.open(0, cut) as a, subject.open(cut) as b:

        def both(items: list[SeqInput]) -> tuple[list, list]:
            ref = whole.forward(items)
            hidden = a.forward(items)
            mid = [
                SeqInput(i.seq_id, i.start_pos, hidden=h)
                for i, h in zip(items, hidden, strict=True)
            ]
            return ref, b.forward(mid[::-1])[::-1]

        ref, split = both([SeqInput(s, 0, tokens=p) for s, p in enumerate(prompts)])
        for _ in range(3):
            items = [SeqInput(s, len(prompts[s]) + _, tokens=np.array([int(np.argmax(r[-1]))]))
                     for s, r in enumerate(ref)]  # fmt: skip
            ref, split = both(items)
            for r, s in zip(ref, split, strict=True):
                assert int(np.argmax(r[-1])) == int(np.argmax(s[-1]))
                np.testing.assert_allclose(s, r, atol=SPLIT_TOL * float(np.abs(r).max()), rtol=0)


def test_fork_copies_a_sequence_cache(subject: Subject) -> None:
    """A forked sequence continues exactly like its source, and both decode
    together afterwards (n samples of one prompt share its prefill)."""
    prompt = _ids(6, 31)
    with subject.open() as backend:
        first = backend.forward([SeqInput(1, 0, tokens=prompt)])[0]
        if not backend.fork(1, 2):
            pytest.skip(f"{subject.cls.name} cannot fork a sequence (Backend.fork)")
        assert not backend.fork(1, 2)  # dst exists
        tok = np.array([int(np.argmax(first[-1]))], np.int64)
        a, b = backend.forward([SeqInput(1, 6, tokens=tok), SeqInput(2, 6, tokens=tok)])
        np.testing.assert_allclose(b, a, atol=1e-4 * float(np.abs(a).max()), rtol=0)
        backend.release(1)
        c = backend.forward([SeqInput(2, 7, tokens=np.array([int(np.argmax(b[-1]))]))])[0]
        assert c.shape == a.shape and np.isfinite(c).all()
