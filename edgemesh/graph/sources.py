"""Which framework a model file comes from, and the dispatch to its importer.

``detect(spec)`` looks at the path only (suffix, folder contents), never
loads anything, so a wrong guess costs nothing. Each framework's importer
(``import_torch``, ``import_tf``, ``import_paddle``, ``import_onnx``) turns
the model into an fp32 ONNX file plus a *reference*: a function that runs
the source framework itself, whose outputs every precision is measured
against. The options and the result they share live in ``imported``, so an
importer never imports this dispatcher back.
"""

from __future__ import annotations

from pathlib import Path

from edgemesh.errors import ConfigError, ModelNotFoundError
from edgemesh.graph.imported import Imported, ImportOptions

FRAMEWORKS = ("pytorch", "tensorflow", "paddle", "onnx")
EXTRAS = {
    "pytorch": "import-torch",
    "tensorflow": "import-tf",
    "paddle": "import-paddle",
    "onnx": "onnx",
}


def detect(spec: str) -> str:
    """The framework of ``spec`` (a path, or ``module:factory`` for PyTorch)."""
    path = Path(spec).expanduser()
    if not path.exists():
        if ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":")[0]:
            return "pytorch"
        raise ModelNotFoundError(
            f"'{spec}' does not exist",
            hint="pass a model file/folder, or module:factory for a PyTorch module",
        )
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "tensorflow"
        if any(path.glob("*.pdmodel")) or any(path.glob("*.pdiparams")):
            return "paddle"
        raise ConfigError(
            f"'{path}' is a folder but neither a TensorFlow SavedModel (saved_model.pb) nor a "
            "PaddlePaddle inference model (*.pdmodel/*.pdiparams)"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt2", ".pt", ".pth", ".ts", ".torchscript"):
        return "pytorch"
    if suffix in (".keras", ".h5"):
        return "tensorflow"
    if suffix in (".pdmodel", ".pdiparams") or (
        suffix == ".json" and path.with_suffix(".pdiparams").is_file()
    ):
        return "paddle"
    raise ConfigError(
        f"cannot tell which framework '{path.name}' comes from",
        hint="use .onnx, .pt2 (torch.export), .pt (TorchScript), .keras, a SavedModel folder, "
        "a Paddle inference model (.pdmodel/.json + .pdiparams), or module:factory",
    )


def run_import(spec: str, work: Path, options: ImportOptions) -> Imported:
    """Convert ``spec`` into ``work/source.onnx`` with its framework's exporter."""
    framework = detect(spec)
    if framework == "pytorch":
        from edgemesh.graph import import_torch

        return import_torch.run(spec, work, options)
    if framework == "tensorflow":
        from edgemesh.graph import import_tf

        return import_tf.run(Path(spec).expanduser(), work, options)
    if framework == "paddle":
        from edgemesh.graph import import_paddle

        return import_paddle.run(Path(spec).expanduser(), work, options)
    from edgemesh.graph import import_onnx

    return import_onnx.run(Path(spec).expanduser(), work, options)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"input shape '{text}' must be integers like 1,3,224,224") from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"input shape '{text}' must be positive integers like 1,3,224,224")
    return dims
