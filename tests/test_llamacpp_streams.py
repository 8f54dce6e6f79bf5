"""llama.cpp's per-sequence KV streams: how a step's rows reach ``llama_decode``.

With one KV stream per sequence, llama.cpp keeps a step's sequences in one
ubatch only when their streams ascend without gaps; any other order runs the
model once per sequence (8 decode rows on this box: 48 ms in order, 180 ms
reversed). Every step's rows must therefore reach ``llama_decode`` sorted by
stream, and new sequences take the lowest free streams, whatever order the
engine lists them in and whichever sequences left before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec

pytest.importorskip("llama_cpp", reason="needs the extra: pip install 'edgemesh[llamacpp]'")
pytestmark = pytest.mark.llamacpp


def _open(gguf: Path, sequences: int):  # type: ignore[no-untyped-def]
    from edgemesh.backends.llamacpp import LlamaCppBackend, gguf_layer_count

    layers = gguf_layer_count(gguf)
    spec = ShardSpec(gguf, LayerRange(0, layers), layers, "int4")
    options = BackendOptions(threads=1, max_sequences=sequences, context_length=64)
    return LlamaCppBackend(spec, options)


def test_rows_reach_llama_decode_in_stream_order(default_gguf: Path) -> None:
    backend = _open(default_gguf, 6)
    calls: list[list[tuple[int, int]]] = []
    decode = backend._decode

    def spy(chunk, rows):  # type: ignore[no-untyped-def]
        calls.append([(slot, pos) for _, _, pos, slot, _ in chunk])
        decode(chunk, rows)

    backend._decode = spy  # type: ignore[method-assign]
    try:
        prompt = np.array([10, 20, 30], np.int64)
        # Six sequences listed in descending id order; then the middle ones leave.
        first = backend.forward([SeqInput(s, 0, tokens=prompt) for s in (6, 5, 4, 3, 2, 1)])
        for sid in (4, 2, 3):
            backend.release(sid)
        # Two newcomers and three running sequences, listed out of order.
        items = [SeqInput(9, 0, tokens=prompt[:2]), SeqInput(1, 3, tokens=prompt[:1]),
                 SeqInput(8, 0, tokens=prompt[:2]), SeqInput(6, 3, tokens=prompt[:1]),
                 SeqInput(5, 3, tokens=prompt[:1])]  # fmt: skip
        second = backend.forward(items)
    finally:
        backend.close()
    assert len(first) == 6 and all(o.shape == (1, backend.n_vocab) for o in first)
    assert [o.shape for o in second] == [(1, backend.n_vocab)] * 5
    for chunk in calls:
        assert chunk == sorted(chunk), chunk
    # Ids 4, 2, 3 freed streams 2, 4, 3; the newcomers take the lowest, 2 and 3.
    streams = sorted({slot for slot, _ in calls[-1]})
    assert streams == [0, 1, 2, 3, 5], streams
    # Outputs still follow the caller's order: the first newcomer (id 9) prefilled
    # the same two tokens as id 8, so their logits match; id 1 is another row.
    np.testing.assert_allclose(second[0], second[2], rtol=0, atol=1e-5)
