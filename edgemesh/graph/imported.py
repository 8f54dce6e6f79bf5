"""What every framework importer takes and returns: ``ImportOptions`` in,
``Imported`` (an fp32 ONNX file plus its reference) out.

Its own module so the importers (``import_torch``, ``import_tf``,
``import_paddle``, ``import_onnx``, ``paddle_env``) and the dispatcher that
calls them (``sources.run_import``) import these types without importing
each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemesh.graph.manifest import SourceInfo

Reference = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Inputs in graph order -> outputs in graph order, run by the source framework."""


@dataclass(frozen=True)
class ImportOptions:
    input_shapes: tuple[tuple[int, ...], ...] = ()
    """Example input shapes (TorchScript, module:factory, Keras without fixed
    shapes); a leading 1 becomes the dynamic batch axis when ``dynamic_batch``."""
    opset: int = 17
    dynamic_batch: bool = True


@dataclass
class Imported:
    onnx_path: Path
    source: SourceInfo
    reference: Reference | None
    """None for ONNX files: onnxruntime on the file itself is the reference."""
    preprocessing: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    keep_alive: Any = None
    """An object the reference needs alive (a loaded SavedModel owns its signatures' variables)."""
