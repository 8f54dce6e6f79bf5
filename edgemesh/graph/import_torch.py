"""PyTorch -> ONNX: a torch.export ExportedProgram (.pt2), TorchScript, or module:factory.

* ``.pt2`` (``torch.export.save``): exported with the dynamo exporter, which
  keeps the program's own dynamic dimensions; the reference is
  ``program.module()``.
* TorchScript (``.pt``/``.ts``) and ``module:factory``: the TorchScript
  exporter (fast, no onnxscript) from example inputs; axis 0 of every input
  and output is marked dynamic (``batch``) unless ``dynamic_batch`` is off.
  A factory returns a module, or ``(module, example_inputs)``; without
  example inputs ``--input-shape`` is needed.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.errors import ConfigError, CorruptArtifactError, ModelNotFoundError, require
from edgemesh.graph.imported import Imported, ImportOptions
from edgemesh.graph.manifest import SourceInfo

log = logging.getLogger(__name__)
EXTRA = "import-torch"


def run(spec: str, work: Path, options: ImportOptions) -> Imported:
    torch = require("torch", EXTRA)
    path = Path(spec).expanduser()
    out = work / "source.onnx"
    if path.exists() and path.suffix.lower() == ".pt2":
        return _exported_program(torch, path, out, options)
    if path.exists():
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError/zip errors for bad files
            raise CorruptArtifactError(str(path), f"torch.jit.load failed: {exc}") from exc
        form, example = "torchscript", None
    else:
        module, example = _factory(spec)
        form = "factory"
    module.eval()
    args = example if example is not None else _examples(torch, options)
    names_in = _names("input", len(args))
    with torch.no_grad():
        outputs = _flatten(module(*args))
    names_out = _names("output", len(outputs))
    axes = {n: {0: "batch"} for n in [*names_in, *names_out]} if options.dynamic_batch else None
    _quiet_export(
        torch,
        module,
        tuple(args),
        out,
        input_names=names_in,
        output_names=names_out,
        dynamic_axes=axes,
        opset_version=options.opset,
        dynamo=False,
    )
    return Imported(
        onnx_path=out,
        source=SourceInfo("pytorch", torch.__version__, spec, form),
        reference=_reference(torch, module),
    )


def _exported_program(torch: Any, path: Path, out: Path, options: ImportOptions) -> Imported:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # zip/pickle/version errors of a damaged file
        raise CorruptArtifactError(str(path), f"torch.export.load failed: {exc}") from exc
    _quiet_export(torch, program, (), out, opset_version=max(options.opset, 18), dynamo=True)
    return Imported(
        onnx_path=out,
        source=SourceInfo("pytorch", torch.__version__, str(path), "exported-program"),
        reference=_reference(torch, program.module()),
    )


def _quiet_export(torch: Any, model: Any, args: tuple, out: Path, **kwargs: Any) -> None:
    """torch.onnx.export, with its errors turned into an UnsupportedModelError
    that keeps torch's message (it names the operator it could not export)."""
    import warnings

    from edgemesh.errors import UnsupportedModelError

    try:
        with warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice; its output is still checked below.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, str(out), **kwargs)
    except Exception as exc:
        raise UnsupportedModelError(
            f"torch.onnx.export failed: {str(exc).strip().splitlines()[-1][:500]}",
            hint="an operator without an ONNX export is named above; rewrite it or register "
            "a symbolic (torch.onnx docs)",
        ) from exc


def _factory(spec: str) -> tuple[Any, tuple | None]:
    module_name, _, attr = spec.partition(":")
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, ".")  # the user's working folder, as `python -m` would
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(f"cannot import module '{module_name}': {exc}") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelNotFoundError(f"module '{module_name}' has no callable '{attr}'")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2:
        model, example = made
        example = tuple(example) if isinstance(example, (list, tuple)) else (example,)
        return model, example
    return made, None


def _examples(torch: Any, options: ImportOptions) -> tuple:
    if not options.input_shapes:
        raise ConfigError(
            "a TorchScript file or a factory without example inputs needs --input-shape",
            hint="e.g. --input-shape 1,3,224,224 (repeat for several inputs), or return "
            "(module, example_inputs) from the factory",
        )
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen) for shape in options.input_shapes)


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _flatten(value: Any) -> list[Any]:
    """A module's outputs in the order the ONNX exporters flatten them."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return [value]


def _reference(torch: Any, module: Any):
    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [t.detach().cpu().numpy() for t in _flatten(out)]

    return run
