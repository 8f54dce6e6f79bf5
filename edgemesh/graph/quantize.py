"""fp16 and int8 graphs from the fp32 graph (onnxruntime's own tools).

* fp16: every float weight and activation cast (``keep_io_types``: the
  graph still takes and returns fp32, so a client sends the same tensors
  to every precision).
* int8, static QDQ: per-channel int8 weights, uint8 activations whose
  ranges come from the calibration samples (min/max), as
  QuantizeLinear/DequantizeLinear pairs every engine (onnxruntime,
  OpenVINO, TensorRT explicit quantization) fuses into int8 kernels.
* int8, dynamic: weights only, activation ranges computed per call; used
  only when static cannot apply (no calibration samples).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgemesh.errors import UnsupportedModelError, require

log = logging.getLogger(__name__)


def to_fp16(src: Path, dst: Path) -> None:
    import onnx

    require("onnxruntime", "onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # Resize/Range take float scales that fp16 loses precision on; keep them fp32.
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["Resize", "Range"])
    onnx.save_model(half, str(dst))


def to_int8_static(
    src: Path, dst: Path, samples: list[list[np.ndarray]], input_names: list[str]
) -> None:
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self._it, None)
            return None if row is None else dict(zip(input_names, row, strict=True))

    prepared = _pre_process(src, dst.with_suffix(".prep.onnx"))
    try:
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # onnxruntime raises bare Exceptions from its passes
        raise UnsupportedModelError(f"static int8 quantization failed: {exc}") from exc
    finally:
        if prepared != src:
            prepared.unlink(missing_ok=True)


def to_int8_dynamic(src: Path, dst: Path) -> None:
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = _pre_process(src, dst.with_suffix(".prep.onnx"))
    try:
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as exc:
        raise UnsupportedModelError(f"dynamic int8 quantization failed: {exc}") from exc
    finally:
        if prepared != src:
            prepared.unlink(missing_ok=True)


def _pre_process(src: Path, out: Path) -> Path:
    """Shape inference + graph optimisation before calibration (onnxruntime's
    recommended step); the plain graph when it cannot be applied.

    It runs in a child process whose working folder is a temp folder: when
    onnxruntime's symbolic shape inference gives up it saves a debug copy of
    the model (``sym_shape_infer_temp.onnx`` plus its weights) into the
    working folder, which would litter the user's folder, and changing this
    process's folder instead would move every other thread with it.
    """
    import subprocess
    import tempfile

    from edgemesh.reexec import python_argv

    code = (
        "import sys\n"
        "from onnxruntime.quantization.shape_inference import quant_pre_process\n"
        "quant_pre_process(sys.argv[1], sys.argv[2], skip_symbolic_shape=False)\n"
    )
    with tempfile.TemporaryDirectory(prefix="edgemesh-prep-") as work:
        done = subprocess.run(
            python_argv(code, str(src.resolve()), str(out.resolve())),
            cwd=work,
            capture_output=True,
            text=True,
        )
    if done.returncode == 0 and out.is_file():
        return out
    # Symbolic shape inference gives up on some graphs: calibrate the plain one.
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
    log.info("quantization pre-processing skipped: %s", reason)
    out.unlink(missing_ok=True)
    return src
