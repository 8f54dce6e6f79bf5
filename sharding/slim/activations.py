"""Per-layer calibration inputs, from the package's own fp32 pieces.

The package holds one ONNX graph per decoder layer, so AWQ and GPTQ can
calibrate one layer at a time: the prologue gives each window's rotary
tables and masks, the embedding its hidden states, and each layer's output
(after that layer was quantised, so later layers see the error earlier
ones make, as GPTQ's sequential mode does) becomes the next layer's input.
Nothing but onnxruntime and the package's files is needed: no torch, no
source checkpoint.

A sample is one window of ``S`` calibration tokens with an empty KV cache::

    hidden [1,S,H]  cos/sin [1,S,D]  mask [1,1,S,S]  past_key/past_value [1,KV,0,D]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgemesh.errors import require
from edgemesh.sharding.package.folder import PROLOGUE, Package, piece_path

Sample = dict[str, np.ndarray]


def session(model: Any, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of an in-memory ModelProto (weights inline)."""
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def load_piece(pkg: Package, rel: str) -> Any:
    """A piece with its external weights read in (verified against the manifest first)."""
    onnx = require("onnx", "onnx")
    names = {a.path for a in pkg.manifest.artifacts}
    pkg.verify([r for r in (rel, f"{rel}.data") if r in names])
    return onnx.load(str(pkg.root / rel), load_external_data=True)


class LayerFeeder:
    """Walks calibration windows through the layers, one layer at a time."""

    def __init__(self, pkg: Package, windows: list[list[int]], threads: int | None = None) -> None:
        self.pkg, self.threads = pkg, threads
        extra = pkg.manifest.extra
        self.types = list(extra["layer_types"])
        kv_shape = (1, int(extra["kv_heads"]), 0, int(extra["head_dim"]))
        self.empty = np.zeros(kv_shape, dtype=np.float32)
        prologue = session(load_piece(pkg, PROLOGUE), threads)
        embed = session(load_piece(pkg, piece_path("embed", "fp32")), threads)
        out_names = [o.name for o in prologue.get_outputs()]
        self.tables: list[dict[str, np.ndarray]] = []
        self.hidden: list[np.ndarray] = []
        for ids in windows:
            pos = np.arange(len(ids), dtype=np.int64)[None]
            outs = prologue.run(None, {"position_ids": pos, "past_key": self.empty})
            self.tables.append(dict(zip(out_names, outs, strict=True)))
            tokens = np.asarray(ids, dtype=np.int64)[None]
            self.hidden.append(embed.run(["hidden"], {"input_ids": tokens})[0])  # [1,S,H]

    def samples(self, index: int) -> list[Sample]:
        """Layer ``index``'s inputs, one dict per window."""
        kind = self.types[index]
        return [
            {
                "hidden": h,
                "cos": t[f"cos.{kind}"],
                "sin": t[f"sin.{kind}"],
                "mask": t[f"mask.{kind}"],
                "past_key": self.empty,
                "past_value": self.empty,
            }
            for h, t in zip(self.hidden, self.tables, strict=True)
        ]

    def advance(self, index: int, layer: Any) -> None:
        """Run layer ``index`` (as given: fp32 or already slimmed) on every window."""
        sess = session(layer, self.threads)
        self.hidden = [sess.run(["hidden_out"], s)[0] for s in self.samples(index)]
