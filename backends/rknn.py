"""RKNN backend: a layer range on a Rockchip NPU (RK3588 and kin) via rknn-toolkit-lite2.

The NPU runs graphs with **static shapes only**, so a range is converted
offline (``deploy/rknn/convert.py``, rknn-toolkit2 on an x86 host) into
two ``.rknn`` files with fixed shapes, and the KV cache lives on the host in
fixed-size buffers:

* ``decode.rknn``: ``S = 1`` new token;
* ``prefill.rknn``: ``S = chunk`` new tokens (prompts go in chunks; the last
  chunk is padded and its padding is never written to the cache);
* both take ``past_key.<i>``/``past_value.<i>`` ``[1, KV, C, D]`` (C = the
  fixed context, ``context`` in ``meta.json``: 512 by default) and one
  additive attention mask per layer type, ``mask.<type> [1, 1, S, C + S]``
  (0 = attend, float32 min = masked), built on the host, which hides the
  unused tail of the buffer and the padding of a short chunk;
* they return ``hidden_out [1, S, H]`` or ``logits [1, 1, V]`` (the row
  picked by ``logit_index [1]``) and only the new cache rows
  ``new_key.<i>``/``new_value.<i>`` ``[1, KV, S, D]``, which the host copies
  into its buffers at the sequence's length.

``static_range_graph`` builds that static ONNX graph from a package's
range graph: the prologue's mask computation is replaced by the mask
inputs, and the new KV rows are sliced out. The host-side scheme
(``StaticKVRunner``) is independent of the runtime that executes the
graph, so the tests run it with onnxruntime on the same static graph and
compare with the dynamic graph; on the board ``RknnBackend`` runs it with
``RKNNLite``.

This module is the only place edgemesh imports ``rknnlite``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.backends.admission import RangeInputs, admit
from edgemesh.backends.base import (
    Backend,
    BoxFacts,
    Capabilities,
    LayerRange,
    SeqInput,
    ShardSpec,
)
from edgemesh.errors import (
    BackendUnavailableError,
    ConfigError,
    CorruptArtifactError,
    InferenceError,
    ModelNotFoundError,
    ShardLoadError,
    require,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 512
DEFAULT_CHUNK = 32
SLIDING = "sliding_attention"
MASKED = float(np.finfo(np.float32).min)
NPU_DEVICES = ("/dev/rknpu", "/sys/kernel/debug/rknpu", "/proc/device-tree/npu@fdab0000")
# RKNNLite core masks by name; "auto" lets the driver pick an idle core.
CORE_MASKS = {
    "auto": "NPU_CORE_AUTO",
    "0": "NPU_CORE_0",
    "1": "NPU_CORE_1",
    "2": "NPU_CORE_2",
    "0_1": "NPU_CORE_0_1",
    "0_1_2": "NPU_CORE_0_1_2",
    "all": "NPU_CORE_0_1_2",
}


def rknn_dir(package: Path, start: int, stop: int) -> Path:
    """Where ``deploy/rknn/convert.py`` writes a range's ``.rknn`` files by default."""
    return Path(package) / "rknn" / f"layers_{start}_{stop}"


# -- the static graph (built on the conversion host; tested with onnxruntime) --


def static_range_graph(
    range_onnx: Path, out: Path, *, seq: int, context: int, kv_heads: int, head_dim: int
) -> dict[str, Any]:
    """Write a static-shape copy of a range graph to ``out``; return its I/O description.

    ``range_onnx`` is ``Package.range_graph(...)`` output. Shapes are fixed to
    batch 1, ``seq`` new tokens and ``context`` cached slots; the masks
    become inputs and the outputs are the new KV rows only.
    """
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgemesh.sharding.package.folder import prune_graph, write_piece

    model = onnx.load(str(range_onnx))
    graph = model.graph
    mask_names = sorted({i for n in graph.node for i in n.input if i.startswith("mask.")})
    # Drop the nodes that compute the masks (the prologue's), keep the rest.
    producers = {o: n for n in graph.node for o in n.output}
    mask_nodes: set[int] = set()
    stack = [producers[m] for m in mask_names if m in producers]
    while stack:  # the masks' exclusive ancestry is pruned below by reachability
        node = stack.pop()
        mask_nodes.add(id(node))
    nodes = [n for n in graph.node if id(n) not in mask_nodes]
    old_inputs = {i.name: i for i in graph.input}
    first = "input_ids" if "input_ids" in old_inputs else "hidden_in"
    layers = sorted(int(i.split(".")[1]) for i in old_inputs if i.startswith("past_key."))
    last = "logit_index" in old_inputs
    hidden = None
    if first == "hidden_in":
        hidden = old_inputs["hidden_in"].type.tensor_type.shape.dim[2].dim_value
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info(first, i64 if first == "input_ids" else f32,
                                      [1, seq] if first == "input_ids" else [1, seq, hidden]),
        helper.make_tensor_value_info("position_ids", i64, [1, seq]),
    ]  # fmt: skip
    for layer in layers:
        for kind in ("past_key", "past_value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"{kind}.{layer}", f32, [1, kv_heads, context, head_dim]
                )
            )
    inputs += [
        helper.make_tensor_value_info(m, f32, [1, 1, seq, context + seq]) for m in mask_names
    ]
    if last:
        inputs.append(helper.make_tensor_value_info("logit_index", i64, [1]))
    start = numpy_helper.from_array(np.array([context], np.int64), "static.kv_start")
    end = numpy_helper.from_array(np.array([context + seq], np.int64), "static.kv_end")
    axis = numpy_helper.from_array(np.array([2], np.int64), "static.kv_axis")
    graph.initializer.extend([start, end, axis])
    outputs = []
    main = "logits" if last else "hidden_out"
    old_out = {o.name: o for o in graph.output}
    main_shape = (
        [1, 1, old_out["logits"].type.tensor_type.shape.dim[2].dim_value]
        if last
        else [1, seq, old_out["hidden_out"].type.tensor_type.shape.dim[2].dim_value]
    )
    outputs.append(helper.make_tensor_value_info(main, f32, main_shape))
    for layer in layers:
        for kind, new in (("present_key", "new_key"), ("present_value", "new_value")):
            nodes.append(
                helper.make_node(
                    "Slice",
                    [f"{kind}.{layer}", "static.kv_start", "static.kv_end", "static.kv_axis"],
                    [f"{new}.{layer}"],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(f"{new}.{layer}", f32, [1, kv_heads, seq, head_dim])
            )
    kept, inits = prune_graph(nodes, list(graph.initializer), {o.name for o in outputs})
    new_graph = helper.make_graph(kept, graph.name + "_static", inputs, outputs, inits)
    static = helper.make_model(new_graph, opset_imports=list(model.opset_import))
    static.ir_version = model.ir_version
    out = Path(out)
    write_piece(static, out.parent, out.name)
    return {
        "inputs": [i.name for i in inputs],
        "outputs": [o.name for o in outputs],
        "seq": seq,
        "context": context,
        "masks": mask_names,
        "layers": layers,
    }


# -- the host side of the static scheme --------------------------------------


Run = Callable[[list[np.ndarray]], list[np.ndarray]]
"""One static graph: inputs in ``meta["inputs"]`` order -> outputs in ``meta["outputs"]`` order."""


@dataclass
class _Sequence:
    length: int
    kv: list[np.ndarray] = field(default_factory=list)
    """[1, KV, C, D] float32 per (layer, key|value); rows >= length are unused."""


class StaticKVRunner:
    """Drives a decode graph (S=1) and a prefill graph (S=chunk) with host KV buffers."""

    def __init__(
        self,
        decode: tuple[Run, dict[str, Any]],
        prefill: tuple[Run, dict[str, Any]],
        *,
        kv_heads: int,
        head_dim: int,
        windows: dict[str, int | None],
        hidden_size: int,
    ) -> None:
        self._decode, self._decode_meta = decode
        self._prefill, self._prefill_meta = prefill
        self.context = int(self._decode_meta["context"])
        self.chunk = int(self._prefill_meta["seq"])
        self._layers = list(self._decode_meta["layers"])
        self._kv_shape = (1, kv_heads, self.context, head_dim)
        self._windows = windows
        self._hidden = hidden_size
        self._first = "input_ids" in self._decode_meta["inputs"]
        self._last = "logit_index" in self._decode_meta["inputs"]
        self.seqs: dict[int, _Sequence] = {}

    def kv_bytes(self) -> int:
        return sum(a.nbytes for s in self.seqs.values() for a in s.kv)

    def admit(self, batch: Sequence[SeqInput], layers: LayerRange, max_sequences: int) -> None:
        """Refuse ``batch`` before any slot is taken (``backends.admission``):
        the graphs hold ``context`` positions, one sequence per slot."""
        accepts = RangeInputs(layers, self._first, self._hidden, self.context, max_sequences)
        admit(batch, accepts, self._cached, len(self.seqs))

    def _cached(self, seq_id: int) -> int | None:
        state = self.seqs.get(seq_id)
        return None if state is None else state.length

    def state(self, seq_id: int, start_pos: int) -> _Sequence:
        """The slot of ``seq_id`` rewound to ``start_pos``, taken if new; only for
        a call ``admit`` let through."""
        state = self.seqs.get(seq_id)
        if state is None:
            kv = [np.zeros(self._kv_shape, np.float32) for _ in range(2 * len(self._layers))]
            state = self.seqs[seq_id] = _Sequence(0, kv)
        state.length = start_pos  # a rewind just forgets the tail: the mask hides it
        return state

    def forward(self, state: _Sequence, data: np.ndarray, logits: str) -> np.ndarray:
        n = int(data.shape[0])
        outs: list[np.ndarray] = []
        if logits == "all" and self._last:
            # The static graphs return one row of logits: feed token by token.
            for i in range(n):
                outs.append(self._step(state, data[i : i + 1], self._decode, self._decode_meta))
            return np.concatenate(outs)
        begin = 0
        while begin < n:
            left = n - begin
            if left == 1:
                take, run, meta = 1, self._decode, self._decode_meta
            else:
                take, run, meta = min(left, self.chunk), self._prefill, self._prefill_meta
            outs.append(self._step(state, data[begin : begin + take], run, meta))
            begin += take
        return outs[-1] if self._last else np.concatenate(outs)

    def _step(self, state: _Sequence, piece: np.ndarray, run: Run, meta: dict) -> np.ndarray:
        s, n, pos = int(meta["seq"]), int(piece.shape[0]), state.length
        feeds: dict[str, np.ndarray] = {}
        if self._first:
            ids = np.zeros((1, s), np.int64)
            ids[0, :n] = piece
            feeds["input_ids"] = ids
        else:
            hidden = np.zeros((1, s, self._hidden), np.float32)
            hidden[0, :n] = piece
            feeds["hidden_in"] = hidden
        feeds["position_ids"] = np.arange(pos, pos + s, dtype=np.int64)[None]
        for j, layer in enumerate(self._layers):
            feeds[f"past_key.{layer}"] = state.kv[2 * j]
            feeds[f"past_value.{layer}"] = state.kv[2 * j + 1]
        for name in meta["masks"]:
            feeds[name] = self._mask(name.split(".", 1)[1], pos, n, s)
        if self._last:
            feeds["logit_index"] = np.array([n - 1], np.int64)
        values = run([feeds[name] for name in meta["inputs"]])
        out = dict(zip(meta["outputs"], values, strict=True))
        for j, layer in enumerate(self._layers):
            state.kv[2 * j][:, :, pos : pos + n] = out[f"new_key.{layer}"][:, :, :n]
            state.kv[2 * j + 1][:, :, pos : pos + n] = out[f"new_value.{layer}"][:, :, :n]
        state.length = pos + n
        if self._last:
            return np.asarray(out["logits"][0], np.float32)  # [1, V]
        return np.asarray(out["hidden_out"][0, :n], np.float32)  # [n, H]

    def _mask(self, kind: str, pos: int, n: int, s: int) -> np.ndarray:
        """Additive mask ``[1, 1, s, C + s]``: cached slots ``< pos``, then the new rows."""
        c = self.context
        qpos = pos + np.arange(s)[:, None]  # [s, 1] true positions of the new rows
        kpos = np.concatenate([np.arange(c), pos + np.arange(s)])[None, :]  # [1, C + s]
        valid = np.concatenate([np.arange(c) < pos, np.arange(s) < n])[None, :]
        allowed = valid & (kpos <= qpos)
        window = self._windows.get(kind)
        if window:
            allowed &= qpos - kpos < window
        allowed[n:, :] = False  # padded rows attend only to themselves (no NaN rows)
        allowed[np.arange(n, s), c + np.arange(n, s)] = True
        return np.where(allowed, 0.0, MASKED).astype(np.float32)[None, None]


# -- the backend ------------------------------------------------------------------


def npu_present() -> bool:
    return any(Path(p).exists() for p in NPU_DEVICES)


class RknnBackend(Backend):
    """A layer range on a Rockchip NPU from pre-converted ``.rknn`` files."""

    name = "rknn"
    module = "rknnlite"
    extra = "rknn"
    preferred_precision = "int8"  # the NPU's int8 rate is several times its fp16 rate
    capabilities = Capabilities(
        partial_ranges=True,
        precisions=("fp16", "int8"),
        artifact_format="onnx",
        max_batch=1,
        needs_compiled_artifact=True,
        devices=("npu",),
    )

    @classmethod
    def suits(cls, box: BoxFacts) -> int | None:
        return 40 if "rockchip-npu" in box.accelerators else None

    @classmethod
    def available(cls) -> str | None:
        if platform.machine() not in ("aarch64", "arm64"):
            return f"rknn-toolkit-lite2 runs on aarch64 boards only (this is {platform.machine()})"
        if importlib.util.find_spec(cls.module) is None:
            return f"'{cls.module}' is not installed (pip install 'edgemesh[{cls.extra}]')"
        if not npu_present():
            return "no Rockchip NPU driver here (no /dev/rknpu)"
        return None

    def __init__(self, shard: ShardSpec, options: Any = None) -> None:
        super().__init__(shard, options)
        reason = self.available()
        if reason is not None:
            raise BackendUnavailableError(f"RKNN cannot run here: {reason}")
        lite = require("rknnlite.api", "rknn")
        from edgemesh.sharding.package.folder import open_package

        package = open_package(shard.model)
        start, stop = shard.layers.start, shard.layers.stop
        folder = rknn_dir(package.root, start, stop)
        meta = _read_meta(folder, package.range_key(start, stop, "fp32"), shard.precision)
        extra = package.manifest.extra
        self.hidden_size = package.manifest.hidden_size
        self.vocab_size = package.manifest.vocab_size
        self.max_sequences = max(1, self.options.max_sequences)
        self._rknn: list[Any] = []
        core = CORE_MASKS.get(self.options.device.partition(":")[2] or "auto")
        if core is None:
            raise ConfigError(
                f"unknown NPU core '{self.options.device}'",
                hint=f"use npu, npu:0, npu:1, npu:2, npu:0_1 or npu:all ({', '.join(CORE_MASKS)})",
            )
        runs = {}
        try:
            for graph in ("decode", "prefill"):
                runs[graph] = (self._load(lite.RKNNLite, folder / f"{graph}.rknn", core),
                               meta[graph])  # fmt: skip
        except Exception:
            self.close()
            raise
        windows = {t: extra.get("sliding_window") if t == SLIDING else None
                   for t in extra["layer_types"]}  # fmt: skip
        self._runner = StaticKVRunner(
            runs["decode"],
            runs["prefill"],
            kv_heads=int(extra["kv_heads"]),
            head_dim=int(extra["head_dim"]),
            windows=windows,
            hidden_size=self.hidden_size,
        )
        self.context_length = self._runner.context
        self._first, self._last = shard.is_first, shard.is_last
        self._lock = threading.Lock()
        self._closed = False

    def _load(self, cls: Any, path: Path, core_name: str) -> Run:
        if not path.is_file():
            raise ModelNotFoundError(
                f"no '{path.name}' in '{path.parent}'",
                hint="convert the range with deploy/rknn/convert.py (see deploy/rknn/README.md)",
            )
        rknn = cls(verbose=False)
        self._rknn.append(rknn)
        if rknn.load_rknn(str(path)) != 0:
            raise CorruptArtifactError(str(path), "RKNNLite.load_rknn refused it")
        if rknn.init_runtime(core_mask=getattr(cls, core_name)) != 0:
            raise ShardLoadError(
                f"RKNNLite.init_runtime failed for '{path}'",
                hint="check the NPU driver version matches the rknn-toolkit2 that converted it",
            )

        def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
            outputs = rknn.inference(inputs=inputs)
            if outputs is None:
                raise InferenceError(f"RKNNLite.inference returned nothing for '{path.name}'")
            return outputs

        return run

    def forward(self, batch: Sequence[SeqInput]) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise InferenceError("the RKNN backend is closed")
            self._runner.admit(batch, self.shard.layers, self.max_sequences)
            outs = []
            for item in batch:
                data = item.tokens if self._first else item.hidden
                assert data is not None  # admit() checked the input kind
                state = self._runner.state(item.seq_id, item.start_pos)
                try:
                    outs.append(self._runner.forward(state, np.asarray(data), item.logits))
                except (RuntimeError, ValueError) as exc:
                    raise InferenceError(
                        f"RKNN failed on layers {self.shard.layers}: {exc}"
                    ) from exc
            return outs

    def release(self, seq_id: int) -> None:
        with self._lock:
            if not self._closed:
                self._runner.seqs.pop(seq_id, None)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.seqs.clear()
        for rknn in getattr(self, "_rknn", []):
            rknn.release()
        self._rknn = []

    def kv_bytes(self) -> int:
        return self._runner.kv_bytes()


def _read_meta(folder: Path, range_key: str, precision: str) -> dict[str, Any]:
    path = folder / "meta.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no RKNN conversion in '{folder}'",
            hint="run deploy/rknn/convert.py for this range (see deploy/rknn/README.md)",
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptArtifactError(str(path), f"not valid JSON ({exc})") from exc
    if meta.get("range_key") != range_key:
        raise CorruptArtifactError(
            str(path), "converted from another version of this package's graphs"
        )
    if meta.get("precision") != precision:
        raise ConfigError(
            f"'{folder}' was converted at {meta.get('precision')}, the plan asks {precision}",
            hint="convert again with --precision " + precision,
        )
    return meta


BACKEND = RknnBackend
