"""Calibration/eval samples: a folder of images or .npy/.npz files, or seeded noise.

A *sample* is one list of arrays, one per graph input, each with a batch
axis of 1. Rules:

* ``.npz``: one array per input name (any model).
* ``.npy``: single-input models; an array of the input's shape without the
  batch axis is one sample, one with a leading axis is that many samples.
* images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``): single 4-D float input
  with a fixed height and width; resized, then ``x * scale``, ``(x - mean) / std``
  (``preprocessing``, default scale 1/255), in the input's layout (NCHW when
  axis 1 is 1 or 3 channels, else NHWC).

Anything that does not fit the model's inputs raises ``CalibrationError``
naming the file, its shape and the shape the model takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import CalibrationError, TensorError
from edgemesh.graph.tensors import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_SAMPLES = 64
SYNTHETIC_SAMPLES = 16

Sample = list[np.ndarray]


def layout_of(spec: TensorSpec) -> str:
    return "NCHW" if len(spec.shape) == 4 and spec.shape[1] in (1, 3) else "NHWC"


def load_folder(
    folder: Path, inputs: list[TensorSpec], preprocessing: dict[str, Any] | None
) -> list[Sample]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CalibrationError(f"calibration folder '{folder}' does not exist")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy", ".npz") and p.is_file()
    )
    if not files:
        raise CalibrationError(f"calibration folder '{folder}' has no images, .npy or .npz files")
    samples: list[Sample] = []
    for path in files:
        samples.extend(_load_file(path, inputs, preprocessing))
        if len(samples) >= MAX_SAMPLES:
            break
    return samples[:MAX_SAMPLES]


def _load_file(
    path: Path, inputs: list[TensorSpec], preprocessing: dict[str, Any] | None
) -> list[Sample]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as data:
            missing = [s.name for s in inputs if s.name not in data]
            if missing:
                raise CalibrationError(
                    f"'{path.name}' lacks the arrays {missing}; the model's inputs are "
                    f"{[s.name for s in inputs]}"
                )
            return [[_fit(path, s, data[s.name])[0] for s in inputs]]
    if len(inputs) != 1:
        raise CalibrationError(
            f"'{path.name}': a model with {len(inputs)} inputs takes .npz calibration files "
            "(one named array per input)"
        )
    spec = inputs[0]
    array = np.load(path) if suffix == ".npy" else _image(path, spec, preprocessing)
    return [[row] for row in _fit(path, spec, array)]


def _fit(path: Path, spec: TensorSpec, array: np.ndarray) -> list[np.ndarray]:
    """Split/extend ``array`` into batch-1 samples of ``spec``."""
    if array.dtype != spec.dtype and np.can_cast(array.dtype, spec.dtype, "same_kind"):
        array = array.astype(spec.dtype)
    if array.ndim == len(spec.shape) - 1:
        array = array[None]
    if array.ndim != len(spec.shape):
        raise CalibrationError(
            f"'{path.name}' holds an array of shape {list(array.shape)}; input '{spec.name}' "
            f"takes {list(spec.shape)} (-1 = any), with or without the batch axis"
        )
    rows = [array[i : i + 1] for i in range(array.shape[0])]
    for row in rows:
        try:
            spec.check(np.ascontiguousarray(row))
        except TensorError as exc:
            raise CalibrationError(f"'{path.name}': {exc}") from None
    return [np.ascontiguousarray(r) for r in rows]


def _image(path: Path, spec: TensorSpec, preprocessing: dict[str, Any] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(spec.shape) != 4:
        raise CalibrationError(
            f"'{path.name}' is an image but input '{spec.name}' has shape {list(spec.shape)}, "
            "not a 4-D image batch; use .npy files"
        )
    layout = (preprocessing or {}).get("layout") or layout_of(spec)
    c, h, w = spec.shape[1:] if layout == "NCHW" else (spec.shape[3], *spec.shape[1:3])
    if h == -1 or w == -1:
        raise CalibrationError(
            f"input '{spec.name}' has a dynamic height/width {list(spec.shape)}: images cannot "
            "be resized to it; use .npy files of the size to calibrate at"
        )
    try:
        img = Image.open(path)
        img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationError(f"'{path.name}' is not a readable image: {exc}") from exc
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]  # [H, W, 1]
    pre = preprocessing or {}
    x = x * float(pre.get("scale", 1.0 / 255.0))
    x = (x - np.asarray(pre.get("mean", 0.0), np.float32)) / np.asarray(
        pre.get("std", 1.0), np.float32
    )
    if layout == "NCHW":
        x = x.transpose(2, 0, 1)  # [C, H, W]
    return x.astype(spec.dtype)[None]


def synthetic(
    inputs: list[TensorSpec], shapes: tuple[tuple[int, ...], ...] = (), n: int = SYNTHETIC_SAMPLES
) -> list[Sample]:
    """Seeded noise of each input's shape (batch 1): accuracy without a folder.

    Dynamic non-batch axes take their size from ``shapes`` (the import's
    ``--input-shape``); without one they cannot be invented."""
    rng = np.random.default_rng(0)
    concrete = []
    for i, spec in enumerate(inputs):
        shape = list(spec.concrete(1))
        if any(d == -1 for d in spec.shape[1:]):
            if i >= len(shapes):
                raise CalibrationError(
                    f"input '{spec.name}' has dynamic axes {list(spec.shape)}: pass "
                    "--calibration (samples of the real size) or --input-shape"
                )
            shape = [1, *shapes[i][1:]]
        concrete.append((spec, tuple(shape)))
    samples = []
    for _ in range(n):
        row = []
        for spec, shape in concrete:
            if spec.dtype.kind == "f":
                row.append(rng.standard_normal(shape).astype(spec.dtype))
            elif spec.dtype.kind == "b":
                row.append(rng.integers(0, 2, shape).astype(spec.dtype))
            else:
                row.append(rng.integers(0, 10, shape).astype(spec.dtype))
        samples.append(row)
    return samples


def stack(samples: list[Sample]) -> Sample:
    """Samples -> one batch per input: [N, ...]."""
    return [np.concatenate([s[i] for s in samples], axis=0) for i in range(len(samples[0]))]
