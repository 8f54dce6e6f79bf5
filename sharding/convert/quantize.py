"""Precision variants of exported pieces: fp16, int8 and int4 weights.

Every precision keeps float32 at the graph boundaries (hidden states, KV
cache, logits), so shards of different precisions chain without casts in
between; only the weights of the matrix multiplications change:

* ``fp16``: ``Cast -> MatMul(fp16 weights) -> Cast``. Norms, softmax and the
  residual stream stay float32, which keeps Gemma's large activations from
  overflowing half precision.
* ``int8``/``int4``: onnxruntime's ``com.microsoft.MatMulNBits`` with
  symmetric block-wise weights (32 weights per fp32 scale; 4-bit scales
  searched for the least rounding error). ``int4`` keeps the matrices in
  ``SENSITIVE`` (attention values, MLP down-projection, LM head) at 8 bits.
  ``accuracy_level=4`` lets the CPU kernel quantise activations to int8 per
  block: for 8-bit weights it was 13x faster than level 0 on a 640x2048
  matmul here (128 µs vs 1.7 ms) at ~0.5% output error.
* The embedding is a ``Gather`` on the table stored at fp32/fp16, or at 8
  bits for int8 and int4, with rows dequantised by standard ONNX ops
  (``Cast``, ``Sub``, ``Mul``) so every runtime that reads ONNX can run it.

The packing follows MatMulNBits' layout: ``B [N, K/block, block*bits/8]``
uint8, low nibble first; ``scales [N, K/block]``; zero point 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemesh.errors import ConfigError, require
from edgemesh.sharding.package.blocks import blockwise

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    block_size: int = 32
    accuracy_level: int = 4
    sensitive_bits: int | None = None
    """Bits for the matrices named in ``SENSITIVE`` (None: ``bits``)."""

    def bits_for(self, node_name: str) -> int:
        if self.sensitive_bits is not None and any(k in node_name for k in SENSITIVE):
            return self.sensitive_bits
        return self.bits

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


SENSITIVE = ("v_proj", "down_proj", "lm_head")
"""Matrices that keep 8 bits in the int4 variant, as llama.cpp's Q4_K_M keeps
``attn_v``, ``ffn_down`` and the output at 6 bits. Plain 4 bits everywhere
(and a 4-bit embedding) raised the default model's perplexity by 89%
(17.4 -> 32.8, docs/SHARDS.md). The embedding is always stored at 8 bits."""

QUANT: dict[str, QuantConfig] = {
    "int8": QuantConfig(8),
    "int4": QuantConfig(4, sensitive_bits=8),
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}', expected one of {PRECISIONS}")
    return precision


def _matmul_weights(model: Any) -> dict[str, Any]:
    """Initializers used as the 2-D float B input of a MatMul."""
    onnx = require("onnx", "convert")
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            init = inits[node.input[1]]
            if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT:
                found[node.input[1]] = init
    return found


def to_precision(model: Any, precision: str) -> Any:
    """A copy of a fp32 piece whose MatMul weights are stored at ``precision``."""
    onnx = require("onnx", "convert")
    from onnx import helper, numpy_helper

    check_precision(precision)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if precision == "fp32":
        return out
    graph = out.graph
    weights = _matmul_weights(out)
    arrays = {name: numpy_helper.to_array(init) for name, init in weights.items()}
    nodes, new_inits = [], []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        a, b = node.input
        y = node.output[0]
        w = arrays[b]  # [K, N]
        if precision == "fp16":
            new_inits.append(numpy_helper.from_array(w.astype(np.float16), f"{b}.fp16"))
            nodes += [
                helper.make_node("Cast", [a], [f"{y}.a16"], to=onnx.TensorProto.FLOAT16),
                helper.make_node("MatMul", [f"{y}.a16", f"{b}.fp16"], [f"{y}.y16"], name=node.name),
                helper.make_node("Cast", [f"{y}.y16"], [y], to=onnx.TensorProto.FLOAT),
            ]
            continue
        cfg = QUANT[precision]
        bits = cfg.bits_for(node.name)
        packed, scales = blockwise(np.ascontiguousarray(w.T), bits, cfg.block_size)
        new_inits += [
            numpy_helper.from_array(packed, f"{b}.q{bits}"),
            numpy_helper.from_array(scales, f"{b}.scales"),
        ]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [a, f"{b}.q{bits}", f"{b}.scales"],
                [y],
                name=node.name,
                domain=MS_DOMAIN,
                K=int(w.shape[0]),
                N=int(w.shape[1]),
                bits=bits,
                block_size=cfg.block_size,
                accuracy_level=cfg.accuracy_level,
            )
        )
    kept = [i for i in graph.initializer if i.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    if precision in QUANT and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def embedding_model(table: np.ndarray, scale: float, precision: str, opset: int) -> Any:
    """The embedding piece: ``input_ids [B,S]`` int64 -> ``hidden [B,S,H]`` float32.

    ``hidden = table[ids] * scale``, with the table stored at ``precision``.
    """
    onnx = require("onnx", "convert")
    from onnx import TensorProto, helper, numpy_helper

    check_precision(precision)
    v, h = table.shape
    nodes: list[Any] = []
    inits: list[Any] = []
    p = "embed/"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, p + name))
        return p + name

    rows = p + "rows"
    if precision in ("fp32", "fp16"):
        dtype = np.float32 if precision == "fp32" else np.float16
        nodes.append(
            helper.make_node("Gather", [const("table", table.astype(dtype)), "input_ids"], [rows])
        )
        if precision == "fp16":
            nodes.append(helper.make_node("Cast", [rows], [p + "rows32"], to=TensorProto.FLOAT))
            rows = p + "rows32"
    else:
        # 8 bits at int4 too: the rows are read one token at a time, so their
        # size costs memory, not speed, and 4-bit rows cost the most accuracy.
        bits = 8
        block = QUANT[precision].block_size
        block = block if h % block == 0 else h
        packed, scales = blockwise(table, bits, block)  # [V, H/block, block], [V, H/block]
        packed = packed.reshape(v, -1)  # [V, H]
        nodes.append(helper.make_node("Gather", [const("table_q", packed), "input_ids"], [p + "q"]))
        q = p + "q"
        zero = float(2 ** (bits - 1))
        nodes += [
            helper.make_node("Cast", [q], [p + "qf"], to=TensorProto.FLOAT),
            helper.make_node(
                "Sub", [p + "qf", const("zero", np.array(zero, np.float32))], [p + "c"]
            ),
            # [B,S,H] -> [B,S,H/block,block] times the row's scales [B,S,H/block,1]
            helper.make_node("Shape", ["input_ids"], [p + "bs"]),
            helper.make_node(
                "Concat",
                [p + "bs", const("blk", np.array([h // block, block], np.int64))],
                [p + "blkshape"],
                axis=0,
            ),
            helper.make_node("Reshape", [p + "c", p + "blkshape"], [p + "cb"]),
            helper.make_node("Gather", [const("scales", scales), "input_ids"], [p + "s"]),
            helper.make_node("Unsqueeze", [p + "s", const("last", np.array([-1]))], [p + "s1"]),
            helper.make_node("Mul", [p + "cb", p + "s1"], [p + "deq"]),
            helper.make_node(
                "Concat", [p + "bs", const("hid", np.array([h], np.int64))], [p + "hshape"], axis=0
            ),
            helper.make_node("Reshape", [p + "deq", p + "hshape"], [p + "rowsq"]),
        ]
        rows = p + "rowsq"
    if scale != 1.0:
        # Gemma multiplies by sqrt(hidden) in the table's dtype (fp32 here).
        nodes.append(
            helper.make_node("Mul", [rows, const("scale", np.array(scale, np.float32))], ["hidden"])
        )
    else:
        nodes.append(helper.make_node("Identity", [rows], ["hidden"]))
    graph = helper.make_graph(
        nodes,
        "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", h])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
