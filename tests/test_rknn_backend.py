"""RKNN: the NPU path skips off-board; the static-shape scheme is checked everywhere.

``static_range_graph`` + ``StaticKVRunner`` are what runs on the NPU (the
same static ONNX goes to rknn-toolkit2). Here they are executed with
onnxruntime and compared with the dynamic range graph, which checks the
host-built masks, the fixed KV buffers and the chunked, padded prefill.
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemesh.backends import registry
from edgemesh.backends.base import BackendOptions, LayerRange, SeqInput, ShardSpec
from edgemesh.backends.rknn import SLIDING, StaticKVRunner, static_range_graph
from edgemesh.errors import BackendUnavailableError, ContextOverflowError, InferenceError
from tests.fixtures.tiny_models import shared_tiny_package

ort = pytest.importorskip("onnxruntime")

REASON = registry.get("rknn").available()


def _static_runner(package: Path, start: int, stop: int, folder: Path, context: int, chunk: int):
    from edgemesh.sharding.package.folder import open_package

    pkg = open_package(package)
    extra = pkg.manifest.extra
    graph = pkg.range_graph(start, stop, "fp32", folder / "ranges")
    runs = []
    for name, seq in (("decode", 1), ("prefill", chunk)):
        path = folder / f"{name}.onnx"
        meta = static_range_graph(
            graph,
            path,
            seq=seq,
            context=context,
            kv_heads=int(extra["kv_heads"]),
            head_dim=int(extra["head_dim"]),
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(inputs, session=session, meta=meta):
            return session.run(meta["outputs"], dict(zip(meta["inputs"], inputs, strict=True)))

        runs.append((run, meta))
    windows = {t: extra["sliding_window"] if t == SLIDING else None for t in extra["layer_types"]}
    return StaticKVRunner(
        runs[0],
        runs[1],
        kv_heads=int(extra["kv_heads"]),
        head_dim=int(extra["head_dim"]),
        windows=windows,
        hidden_size=pkg.manifest.hidden_size,
    )


def _dynamic(package: Path, start: int, stop: int, tmp: Path):
    from edgemesh.backends.onnxruntime import OnnxRuntimeBackend
    from edgemesh.sharding.package.folder import open_package

    n = open_package(package).num_layers
    opts = BackendOptions(threads=1, cache_dir=tmp / "ranges")
    return OnnxRuntimeBackend(ShardSpec(package, LayerRange(start, stop), n), opts)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_static_graphs_match_the_dynamic_range(arch: str, tmp_path: Path) -> None:
    """Chunked, padded prefill + decode steps on fixed buffers == the dynamic graph.

    gemma3's sliding window (8) is shorter than the prompt, so the host-built
    mask's window matters; chunk 8 with a 21-token prompt pads the last chunk.
    """
    package = shared_tiny_package(arch)
    ids = np.random.default_rng(3).integers(5, 300, size=27).astype(np.int64)
    runner = _static_runner(package, 0, 4 if arch == "gemma3" else 3, tmp_path, 64, 8)
    state = runner.state(7, 0)
    got = [runner.forward(state, ids[:21], "last")]
    for pos in range(21, 27):
        state = runner.state(7, pos)
        got.append(runner.forward(state, ids[pos : pos + 1], "last"))
    with _dynamic(package, 0, 4 if arch == "gemma3" else 3, tmp_path) as ref:
        want = [ref.forward([SeqInput(7, 0, tokens=ids[:21])])[0]]
        for pos in range(21, 27):
            want.append(ref.forward([SeqInput(7, pos, tokens=ids[pos : pos + 1])])[0])
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (1, ref.vocab_size)
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)
    assert runner.kv_bytes() > 0
    runner.seqs.clear()
    assert runner.kv_bytes() == 0


def test_static_hidden_ranges_chain(tmp_path: Path) -> None:
    """A middle range: hidden states in, hidden states out, chunked prefill."""
    package = shared_tiny_package("qwen3")
    ids = np.random.default_rng(4).integers(5, 300, size=11).astype(np.int64)
    with _dynamic(package, 0, 1, tmp_path) as first, _dynamic(package, 1, 2, tmp_path) as mid:
        hidden = first.forward([SeqInput(0, 0, tokens=ids)])[0]  # [11, H]
        want = mid.forward([SeqInput(0, 0, hidden=hidden)])[0]
    runner = _static_runner(package, 1, 2, tmp_path / "mid", 32, 4)
    got = runner.forward(runner.state(0, 0), hidden, "last")
    assert got.shape == want.shape == (11, hidden.shape[1])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_refused_call_keeps_no_slot_on_the_static_graphs(tmp_path: Path) -> None:
    """What RknnBackend.forward runs before it takes a slot: a position gap or a
    call past the graphs' context is refused with no slot taken and no sequence
    moved, so one slot still serves a real sequence afterwards."""
    package = shared_tiny_package("qwen3")
    ids = np.random.default_rng(5).integers(5, 300, size=8).astype(np.int64)
    runner = _static_runner(package, 0, 3, tmp_path, 16, 4)
    layers = LayerRange(0, 3)
    for seq in (7, 8):
        with pytest.raises(InferenceError, match="starts at position 5"):
            runner.admit([SeqInput(seq, 5, tokens=ids[:1])], layers, 1)
    with pytest.raises(ContextOverflowError):
        runner.admit([SeqInput(9, 14, tokens=ids[:3])], layers, 1)
    assert runner.seqs == {}
    runner.admit([SeqInput(0, 0, tokens=ids[:4])], layers, 1)
    runner.forward(runner.state(0, 0), ids[:4], "last")
    with pytest.raises(InferenceError, match="starts at position 6"):
        runner.admit([SeqInput(0, 6, tokens=ids[4:5])], layers, 1)
    assert runner.seqs[0].length == 4
    with pytest.raises(InferenceError, match="slots are busy"):
        runner.admit([SeqInput(1, 0, tokens=ids[:2])], layers, 1)
    runner.admit([SeqInput(0, 4, tokens=ids[4:5])], layers, 1)  # sequence 0 goes on


def test_availability_names_the_missing_piece() -> None:
    reason = registry.get("rknn").available()
    if platform.machine() != "aarch64":
        assert reason is not None and "aarch64" in reason
    elif importlib.util.find_spec("rknnlite") is None:
        assert reason is not None and "rknnlite" in reason
    with pytest.raises(BackendUnavailableError) if reason else _nothing():
        pkg = shared_tiny_package("qwen3")
        registry.get("rknn")(ShardSpec(pkg, LayerRange(0, 3), 3, "fp16"))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_convert_script_explains_a_missing_toolkit(tmp_path: Path) -> None:
    """deploy/rknn/convert.py writes the static ONNX, then needs rknn-toolkit2."""
    if importlib.util.find_spec("rknn") is not None:
        pytest.skip("rknn-toolkit2 is installed here; the full conversion is a hardware test")
    package = shared_tiny_package("qwen3")
    script = Path(__file__).parents[1] / "deploy" / "rknn" / "convert.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(package), "--layers", "0:3", "--out", str(tmp_path),
         "--context", "64", "--chunk", "8"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "rknn-toolkit2" in proc.stderr
    assert (tmp_path / "decode.onnx").is_file() and (tmp_path / "prefill.onnx").is_file()


@pytest.mark.hardware
@pytest.mark.skipif(REASON is not None, reason=f"RKNN: {REASON}")
@pytest.mark.skipif(
    importlib.util.find_spec("rknn") is None,
    reason="RKNN: rknn-toolkit2 (the converter) is not installed on this board",
)
def test_npu_runs_a_converted_range(tmp_path: Path) -> None:
    """On a board: convert the tiny range, run it on the NPU, compare with onnxruntime."""
    import shutil

    package = Path(shutil.copytree(shared_tiny_package("qwen3"), tmp_path / "pkg"))
    script = Path(__file__).parents[1] / "deploy" / "rknn" / "convert.py"
    subprocess.run(
        [sys.executable, str(script), str(package), "--layers", "0:3", "--context", "64",
         "--chunk", "8"],
        check=True, timeout=1200,
    )  # fmt: skip
    ids = np.arange(5, 17, dtype=np.int64)
    with registry.get("rknn")(ShardSpec(package, LayerRange(0, 3), 3, "fp16")) as npu:
        logits = npu.forward([SeqInput(0, 0, tokens=ids)])[0]
        assert logits.shape == (1, npu.vocab_size) and logits.dtype == np.float32
    with _dynamic(package, 0, 3, tmp_path) as ref:
        want = ref.forward([SeqInput(0, 0, tokens=ids)])[0]
    # fp16 on the NPU: compare the ranking, not the digits.
    assert int(np.argmax(logits)) == int(np.argmax(want))
