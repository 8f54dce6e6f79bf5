"""``edgemesh import``: a model from any framework -> a graph package folder.

Steps (each failure is a typed error; nothing is left at ``out`` on failure):

1. The framework's exporter writes an fp32 ONNX graph (``sources.run_import``);
   it is loaded and checked (``graph_check``).
2. Samples: the calibration folder, or seeded noise (``calibration``).
3. fp32 on onnxruntime vs the source framework on the same samples:
   disagreement beyond ``accuracy.FP32_MAX_REL`` raises
   ``ConversionMismatchError`` (the ONNX graph is wrong; nothing is packaged).
4. fp16 and int8 graphs (``quantize``): int8 is static QDQ from the samples
   when a calibration folder is given, dynamic otherwise. Each is measured
   against the source framework's outputs and the figures go in ``graph.json``.
5. sha256 of every file; the folder is renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import ConfigError, ConversionMismatchError, EdgemeshError
from edgemesh.graph import accuracy, calibration, quantize
from edgemesh.graph.graph_check import load_checked, opset_of
from edgemesh.graph.manifest import GraphManifest, PrecisionEntry
from edgemesh.graph.sources import ImportOptions, run_import
from edgemesh.graph.tensors import TensorSpec, specs_from_onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
CHUNK = 8
"""Samples per runtime call while measuring (batched graphs)."""
EVAL_FILE = "eval.npz"
EVAL_SAMPLES = 16


@dataclass(frozen=True)
class BuildOptions:
    name: str | None = None
    calibration: Path | None = None
    precisions: tuple[str, ...] = PRECISIONS
    preprocessing: dict[str, Any] | None = None
    task: str | None = None
    """``classifier``/``generic``; None: a single [N, C] output means classifier."""
    import_options: ImportOptions = field(default_factory=ImportOptions)
    force: bool = False


def build_package(model: str, out: Path, options: BuildOptions | None = None) -> GraphManifest:
    """Import ``model`` into the graph package folder ``out``; returns its manifest."""
    options = options or BuildOptions()
    unknown = [p for p in options.precisions if p not in PRECISIONS]
    if unknown or "fp32" not in options.precisions:
        raise ConfigError(
            f"precisions must include fp32 and be among {PRECISIONS}; got {options.precisions}"
        )
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not options.force:
        raise ConfigError(f"'{out}' exists and is not empty", hint="pass --force to replace it")
    work = out.parent / f".import-{out.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    try:
        manifest = _build(model, out, work, options)
        manifest.import_seconds = round(time.perf_counter() - start, 2)
        manifest.record_files(work)
        manifest.save(work)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(model: str, out: Path, work: Path, options: BuildOptions) -> GraphManifest:
    imported = run_import(model, work, options.import_options)
    proto = load_checked(imported.onnx_path)
    inputs = specs_from_onnx(_graph_inputs(proto))
    outputs = specs_from_onnx(proto.graph.output)
    fp32 = work / "model.fp32.onnx"
    imported.onnx_path.rename(fp32)
    preprocessing = options.preprocessing or imported.preprocessing
    if options.calibration is not None:
        samples = calibration.load_folder(options.calibration, inputs, preprocessing)
        source = "calibration"
    else:
        samples = calibration.synthetic(inputs, options.import_options.input_shapes)
        source = "synthetic"
    task = options.task or _guess_task(outputs)
    batched = all(s.batched for s in inputs)
    chunks = _chunks(samples, batched)

    fp32_outputs = _run_onnx(fp32, inputs, chunks)
    reference = (
        [imported.reference(chunk) for chunk in chunks] if imported.reference else fp32_outputs
    )
    _save_eval(work / EVAL_FILE, inputs, chunks, reference)
    manifest = GraphManifest(
        eval_file=EVAL_FILE,
        name=options.name or out.name,
        source=imported.source,
        opset=opset_of(proto),
        inputs=inputs,
        outputs=outputs,
        task=task,
        preprocessing=preprocessing,
    )

    def measure(precision: str, got: list[list[np.ndarray]]) -> accuracy.Accuracy:
        acc = accuracy.compare(
            reference,
            got,
            classifier=task == "classifier",
            samples=len(samples),
            sample_source=source,
        )
        log.info("%s: %s", precision, acc)
        return accuracy.rounded(acc)

    acc32 = measure("fp32", fp32_outputs)
    if acc32.max_rel > accuracy.FP32_MAX_REL:
        raise ConversionMismatchError(
            f"the fp32 ONNX graph disagrees with {imported.source.framework} "
            f"{imported.source.version or ''}: max abs error {acc32.max_abs:.3g}, relative "
            f"{acc32.max_rel:.3g} > {accuracy.FP32_MAX_REL:g} on {len(samples)} {source} samples",
            hint="the exporter mistranslated an operator; try another --opset, export in eval "
            "mode, or report the model",
        )
    manifest.precisions["fp32"] = PrecisionEntry(
        "model.fp32.onnx", "source", fp32.stat().st_size, acc32
    )
    for precision in options.precisions:
        if precision == "fp32":
            continue
        path = work / f"model.{precision}.onnx"
        try:
            if precision == "fp16":
                quantize.to_fp16(fp32, path)
                method = "cast"
            elif options.calibration is not None:
                quantize.to_int8_static(fp32, path, samples, [s.name for s in inputs])
                method = "static-qdq"
            else:
                quantize.to_int8_dynamic(fp32, path)
                method = "dynamic"
            got = _run_onnx(path, inputs, chunks)
        except EdgemeshError as exc:
            # One precision failing (an op without an int8 kernel) leaves the others usable.
            log.warning("%s graph not produced: %s", precision, exc)
            path.unlink(missing_ok=True)
            continue
        manifest.precisions[precision] = PrecisionEntry(
            path.name, method, path.stat().st_size, measure(precision, got)
        )
    return manifest


def _graph_inputs(proto: Any) -> list[Any]:
    """Graph inputs that are fed (older exporters list initializers as inputs too)."""
    inits = {i.name for i in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def _guess_task(outputs: list[TensorSpec]) -> str:
    if len(outputs) == 1 and len(outputs[0].shape) == 2 and outputs[0].shape[1] > 1:
        return "classifier"
    return "generic"


def _chunks(samples: list[calibration.Sample], batched: bool) -> list[calibration.Sample]:
    if not batched:
        return samples
    return [calibration.stack(samples[i : i + CHUNK]) for i in range(0, len(samples), CHUNK)]


def _run_onnx(
    path: Path, inputs: list[TensorSpec], chunks: list[calibration.Sample]
) -> list[list[np.ndarray]]:
    from edgemesh.backends.graph_onnxruntime import OnnxRuntimeGraph

    runner = OnnxRuntimeGraph.from_file(path, inputs)
    try:
        return [runner.run(dict(zip([s.name for s in inputs], c, strict=True))) for c in chunks]
    finally:
        runner.close()


def _save_eval(
    path: Path,
    inputs: list[TensorSpec],
    chunks: list[calibration.Sample],
    reference: list[list[np.ndarray]],
) -> None:
    """The first ``EVAL_SAMPLES`` samples and the reference outputs on them:
    ``in.<i>`` / ``out.<j>`` arrays stacked on axis 0."""
    arrays: dict[str, np.ndarray] = {}
    for i in range(len(inputs)):
        arrays[f"in.{i}"] = np.concatenate([c[i] for c in chunks])[:EVAL_SAMPLES]
    for j in range(len(reference[0])):
        rows = [np.asarray(r[j]) for r in reference]
        arrays[f"out.{j}"] = np.concatenate(rows)[:EVAL_SAMPLES] if rows[0].ndim else rows[0]
    np.savez(path, **arrays)
