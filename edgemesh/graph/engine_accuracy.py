"""A box's own engine measured against the source framework, not assumed.

``graph.json`` holds each precision's accuracy as onnxruntime computed it at
import. Another engine (OpenVINO, TensorRT, RKNN) computes differently (its
own kernels, fusions, fp16 accumulation, the NPU's own int8 scheme), so when
a box loads one it runs the package's eval samples (``eval.npz``: inputs and
the source framework's outputs) through it and compares, with the same
figures as the import (``accuracy.compare``). The result is cached beside
the compiled artifact (``engines/<box-key>/accuracy.<precision>.json``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.graph import accuracy
from edgemesh.graph.manifest import Accuracy, GraphManifest, sha256_file

log = logging.getLogger(__name__)
CHUNK = 8


def measure(
    backend: Any, manifest: GraphManifest, root: Path, engine_dir: Path | None
) -> Accuracy | None:
    """This engine's accuracy at its precision; None when the package has no eval file."""
    if manifest.eval_file is None or not (root / manifest.eval_file).is_file():
        return None
    cache = None
    graph_digest = manifest.files.get(manifest.precisions[backend.precision].file, "")
    if engine_dir is not None:
        cache = Path(engine_dir) / f"accuracy.{backend.precision}.json"
        if cache.is_file():
            data = json.loads(cache.read_text())
            if data.get("graph_sha256") == graph_digest:
                return Accuracy(**data["accuracy"])
    with np.load(root / manifest.eval_file) as data:
        inputs = [data[f"in.{i}"] for i in range(len(manifest.inputs))]
        want = [data[f"out.{j}"] for j in range(len(manifest.outputs))]
    n = inputs[0].shape[0]
    batched = all(s.batched for s in manifest.inputs)
    step = CHUNK if batched else 1
    names = [s.name for s in manifest.inputs]
    got_chunks, ref_chunks = [], []
    for start in range(0, n, step):
        feeds = {k: x[start : start + step] for k, x in zip(names, inputs, strict=True)}
        got_chunks.append(backend.run(feeds))
        ref_chunks.append([w[start : start + step] for w in want])
    acc = accuracy.rounded(
        accuracy.compare(
            ref_chunks,
            got_chunks,
            classifier=manifest.task == "classifier",
            samples=n,
            sample_source=_source(manifest),
        )
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"graph_sha256": graph_digest, "accuracy": asdict(acc)}))
    log.info("%s on %s/%s: %s", manifest.name, backend.name, backend.precision, acc)
    return acc


def _source(manifest: GraphManifest) -> str:
    fp32 = manifest.precisions.get("fp32")
    return fp32.accuracy.sample_source if fp32 and fp32.accuracy else "calibration"


__all__ = ["measure", "sha256_file"]
