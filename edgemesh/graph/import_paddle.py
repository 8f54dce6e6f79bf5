"""PaddlePaddle inference model -> ONNX with paddle2onnx.

An inference model is ``NAME.json`` (Paddle 3's PIR program) or
``NAME.pdmodel`` (the older ProgramDesc), beside ``NAME.pdiparams``; the
path may be either file or their folder (one model in it). The reference is
Paddle Inference itself (``paddle.inference.create_predictor``) on the same
files. With ``$EDGEMESH_PADDLE_PYTHON`` set, both run in that Python's
environment instead (``paddle_env``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemesh.errors import (
    ConfigError,
    CorruptArtifactError,
    MissingExtraError,
    ModelNotFoundError,
    UnsupportedModelError,
    require,
)
from edgemesh.graph.imported import Imported, ImportOptions
from edgemesh.graph.manifest import SourceInfo

EXTRA = "import-paddle"


def model_files(path: Path) -> tuple[Path, Path]:
    """(program file, params file) of the inference model at ``path``."""
    if path.is_dir():
        programs = sorted([*path.glob("*.json"), *path.glob("*.pdmodel")])
        programs = [p for p in programs if p.with_suffix(".pdiparams").is_file()]
        if len(programs) != 1:
            raise ConfigError(
                f"'{path}' must hold exactly one Paddle inference model (NAME.json or "
                f"NAME.pdmodel beside NAME.pdiparams); found {[p.name for p in programs]}"
            )
        program = programs[0]
    elif path.suffix == ".pdiparams":
        candidates = (path.with_suffix(".json"), path.with_suffix(".pdmodel"))
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise ModelNotFoundError(f"no {path.stem}.json or {path.stem}.pdmodel beside '{path}'")
        program = found[0]
    else:
        program = path
    params = program.with_suffix(".pdiparams")
    if not params.is_file():
        raise ModelNotFoundError(f"the parameters file '{params}' is missing")
    return program, params


def run(path: Path, work: Path, options: ImportOptions) -> Imported:
    from edgemesh.graph import paddle_env

    program, params = model_files(path)
    python = paddle_env.paddle_python()
    if python is not None:  # Paddle in its own venv (paddle2onnx pins an older onnx)
        return paddle_env.run_in_child(python, program, params, work, options)
    try:
        paddle = require("paddle", EXTRA)
        paddle2onnx = require("paddle2onnx", EXTRA)
    except MissingExtraError as exc:  # paddle2onnx would downgrade this env's onnx
        exc.hint = (
            f"{exc.hint} into a venv of its own and set "
            f"{paddle_env.ENV}=VENV/bin/python (docs/MODELS.md)"
        )
        raise
    out = work / "source.onnx"
    try:
        paddle2onnx.export(
            str(program),
            str(params),
            save_file=str(out),
            opset_version=options.opset,
            enable_onnx_checker=True,
        )
    except Exception as exc:  # paddle2onnx raises bare Exceptions naming the op
        raise UnsupportedModelError(
            f"paddle2onnx could not convert '{program.name}': {str(exc).strip()[:500]}",
            hint="an operator paddle2onnx has no mapping for is named above; try another --opset",
        ) from exc
    if not out.is_file():
        raise UnsupportedModelError(
            f"paddle2onnx wrote no ONNX file for '{program.name}' (see its log for the operator)"
        )
    inference = paddle.inference
    config = inference.Config(str(program), str(params))
    config.disable_gpu()
    config.switch_ir_optim(False)  # the reference is the program as written, not a fused one
    try:
        predictor = inference.create_predictor(config)
    except Exception as exc:
        raise CorruptArtifactError(str(program), f"Paddle Inference cannot load it: {exc}") from exc
    in_names = predictor.get_input_names()
    out_names = predictor.get_output_names()

    def reference(inputs: list[np.ndarray]) -> list[np.ndarray]:
        for name, x in zip(in_names, inputs, strict=True):
            handle = predictor.get_input_handle(name)
            handle.reshape(list(x.shape))
            handle.copy_from_cpu(np.ascontiguousarray(x))
        predictor.run()
        return [predictor.get_output_handle(n).copy_to_cpu() for n in out_names]

    return Imported(
        onnx_path=out,
        source=SourceInfo("paddle", paddle.__version__, str(program), program.suffix.lstrip(".")),
        reference=reference,
    )
