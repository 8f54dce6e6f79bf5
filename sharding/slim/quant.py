"""Activation-aware 4-bit weights for one layer piece: AWQ (NNCF) and GPTQ (onnxruntime).

Both calibrate on the layer's own inputs (``activations.LayerFeeder``) and
write ``com.microsoft.MatMulNBits`` at 4 bits, 32 weights per fp32 scale,
symmetric, ``accuracy_level=4``: the layout and size of the package's RTN
``int4`` (``quantize.py``), so backends, costs and the planner see no
difference except the accuracy. As in RTN ``int4``, the matrices in
``quantize.SENSITIVE`` (attention values, MLP down-projection) keep 8 bits:
they are left out of the 4-bit pass and stored by ``quantize.to_precision``
at int8, which also covers anything the 4-bit pass did not take.

* ``awq``: NNCF ``compress_weights`` on the ONNX piece with ``awq=True`` and
  ``scale_estimation=True`` (per-channel scales from the calibration
  activations, then per-block scales fitted to the layer's output). NNCF's
  ONNX backend emits MatMulNBits for opset < 21, which the pieces use.
* ``gptq``: onnxruntime's bundled Intel Neural Compressor GPTQ
  (``onnxruntime.quantization.neural_compressor.gptq_quantize``), the
  algorithm behind its ``GPTQWeightOnlyQuantConfig``; called directly so
  the sensitive matrices can be marked ``"fp32"`` (the quantizer class
  ignores ``nodes_to_exclude`` for GPTQ). Asymmetric (a 4-bit zero point
  per block: +4 bits per 32 weights, ~2% of an int4 layer): its symmetric
  path re-derives each block's scale from the already-rounded weights, and a
  block whose largest weight rounded to -8 lands on another grid, which gave
  the default model's first layer 8x the output error of RTN (asymmetric:
  1.9x; docs/SLIMMING.md).
* ``rtn``: ``quantize.to_precision(piece, "int4")``, the package's own
  int4, for comparison.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Any

from edgemesh.errors import SlimInputError, require
from edgemesh.sharding.convert.quantize import QUANT, SENSITIVE, to_precision
from edgemesh.sharding.slim.activations import Sample

log = logging.getLogger(__name__)

METHODS = ("awq", "gptq", "rtn")
GPTQ_SCHEME = "asym"
BITS = 4
BLOCK = QUANT["int4"].block_size
ACCURACY_LEVEL = QUANT["int4"].accuracy_level
MIN_CALIBRATION_TOKENS = {"awq": 256, "gptq": 256, "rtn": 0}
"""AWQ's channel statistics and GPTQ's Hessian need a few hundred positions per
layer; below ~256 GPTQ's H is rank-deficient for a 640-wide layer and the
damping dominates (a rule of thumb; measured quality is in SLIMMING.md)."""


def check(method: str, bits: int) -> None:
    if method not in METHODS:
        raise SlimInputError(f"unknown quantisation method '{method}', expected one of {METHODS}")
    if bits != BITS:
        raise SlimInputError(
            f"--bits {bits} is not offered for {method}: only 4",
            hint="8-bit round-to-nearest already costs ~0.3% perplexity (the package's int8)",
        )


def _four_bit_matmuls(model: Any) -> tuple[list[str], list[str]]:
    """Names of the MatMuls with a constant weight: (4-bit ones, sensitive ones)."""
    inits = {i.name for i in model.graph.initializer}
    four, keep = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            (keep if any(k in node.name for k in SENSITIVE) else four).append(node.name)
    return four, keep


def slim_layer(model: Any, samples: list[Sample], method: str) -> Any:
    """A copy of a fp32 layer piece with activation-aware 4-bit weights."""
    if method == "rtn":
        return to_precision(model, "int4")
    onnx = require("onnx", "onnx")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    del work.graph.value_info[:]  # shapes recorded at export would pin the sequence length
    four, keep = _four_bit_matmuls(work)
    if method == "awq":
        out = _awq(work, samples, keep)
    else:
        out = _gptq(work, samples, four, keep)
    # the tools' shape inference records every tensor's shape at the calibration
    # windows' length; drop it, as the exported pieces carry none
    del out.graph.value_info[:]
    return to_precision(out, "int8")  # the sensitive matrices, at 8 bits


def _awq(model: Any, samples: list[Sample], keep: list[str]) -> Any:
    nncf = require("nncf", "slim")
    # NNCF logs at INFO to a stdout handler it made at import; stdout may be --json
    nncf.set_log_level(logging.WARNING)
    ignored = nncf.IgnoredScope(names=keep, validate=False) if keep else None
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars; stdout may be --json
        out = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT4_SYM,
            ratio=1.0,
            group_size=BLOCK,
            all_layers=True,
            dataset=nncf.Dataset(samples),
            subset_size=len(samples),
            awq=True,
            scale_estimation=True,
            ignored_scope=ignored,
        )
    # NNCF leaves accuracy_level unset (0); the package's int4 runs at 4
    # (int8 activations per block), 13x faster on this CPU (quantize.py).
    onnx = require("onnx", "onnx")
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            level = onnx.helper.make_attribute("accuracy_level", ACCURACY_LEVEL)
            node.attribute.extend([*kept, level])
    return out


def _gptq(model: Any, samples: list[Sample], four: list[str], keep: list[str]) -> Any:
    require("onnxruntime", "onnx")
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    config: dict[str, Any] = {
        n: {"bits": BITS, "group_size": BLOCK, "scheme": GPTQ_SCHEME} for n in four
    }
    config.update({n: "fp32" for n in keep})
    with contextlib.redirect_stdout(sys.stderr):  # its progress bar prints to stdout
        result = gptq_quantize(
            model,
            [(s, None) for s in samples],
            weight_config=config,
            num_bits=BITS,
            group_size=BLOCK,
            scheme=GPTQ_SCHEME,
            n_samples=-1,
            percdamp=0.01,
            blocksize=128,
            actorder=False,
            mse=False,
            perchannel=True,
            accuracy_level=ACCURACY_LEVEL,
        )
    out = result.model
    _rename_nodes(out)
    return out


def _rename_nodes(model: Any) -> None:
    """GPTQ names its nodes ``<matmul>_Q4``; keep the MatMul's own name so that
    per-node rules (``quantize.SENSITIVE``) and profiles read the same."""
    for node in model.graph.node:
        node.name = re.sub(r"_Q4$", "", node.name)
