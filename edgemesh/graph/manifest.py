"""``graph.json``: what an imported graph package holds, and the checks on it.

The manifest names every file with its sha256 (``files``); opening a package
for serving verifies the files of the precision it will run
(``verify``), so a truncated copy fails with ``CorruptArtifactError`` before
any runtime sees it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import CorruptArtifactError, ModelNotFoundError
from edgemesh.graph.tensors import TensorSpec

MANIFEST = "graph.json"
FORMAT = "edgemesh-graph/1"
PRECISION_ORDER = ("int8", "fp16", "fp32")
"""Most compressed first, like the LLM path's ``_TOWARDS_ACCURATE``."""


@dataclass
class Accuracy:
    """One precision's outputs against the source framework's, on ``samples`` inputs.

    ``loss`` is the figure the accuracy budget is compared with: for a
    classifier ``1 - top1_agreement``; otherwise the relative L2 error
    ``‖y - y_ref‖ / ‖y_ref‖`` over all outputs and samples.
    """

    max_abs: float
    max_rel: float
    rel_l2: float
    top1_agreement: float | None
    samples: int
    sample_source: str
    """``calibration`` (the user's folder) or ``synthetic`` (seeded noise)."""
    loss: float


@dataclass
class PrecisionEntry:
    file: str
    method: str
    """e.g. ``source`` (fp32), ``cast`` (fp16), ``static-qdq`` / ``dynamic`` (int8)."""
    bytes: int
    accuracy: Accuracy | None = None


@dataclass
class SourceInfo:
    framework: str
    """``pytorch``, ``tensorflow``, ``paddle`` or ``onnx``."""
    version: str | None
    file: str
    form: str
    """e.g. ``exported-program``, ``torchscript``, ``factory``, ``saved-model``, ``keras``."""


@dataclass
class GraphManifest:
    name: str
    source: SourceInfo
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    task: str = "generic"
    """``classifier`` (one [N, classes] output: top-1 agreement is measured) or ``generic``."""
    preprocessing: dict[str, Any] | None = None
    precisions: dict[str, PrecisionEntry] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """relative path -> sha256 of every file in the package (engines excluded: per box)."""
    import_seconds: float | None = None
    eval_file: str | None = None
    """``eval.npz``: samples and the source framework's outputs on them, so a
    box measures its own engine's accuracy (``engine_accuracy``)."""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphManifest:
        precisions = {}
        for p, e in (data.get("precisions") or {}).items():
            acc = e.get("accuracy")
            precisions[p] = PrecisionEntry(
                file=e["file"],
                method=e["method"],
                bytes=int(e["bytes"]),
                accuracy=Accuracy(**acc) if acc else None,
            )
        return cls(
            name=data["name"],
            source=SourceInfo(**data["source"]),
            opset=int(data["opset"]),
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            task=data.get("task", "generic"),
            preprocessing=data.get("preprocessing"),
            precisions=precisions,
            files=dict(data.get("files") or {}),
            import_seconds=data.get("import_seconds"),
            eval_file=data.get("eval_file"),
            format=data.get("format", FORMAT),
        )

    @classmethod
    def load(cls, folder: Path | str) -> GraphManifest:
        path = Path(folder).expanduser() / MANIFEST
        if not path.is_file():
            raise ModelNotFoundError(
                f"'{folder}' is not a graph package (no {MANIFEST})",
                hint="build one with `edgemesh import MODEL --out DIR`",
            )
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(str(path), f"unreadable manifest: {exc}") from exc

    def record_files(self, folder: Path) -> None:
        """Hash every file under ``folder`` except the manifest and ``engines/``."""
        folder = Path(folder)
        self.files = {
            str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and "engines" not in p.relative_to(folder).parts
        }

    def verify(self, folder: Path, precision: str) -> Path:
        """The path of ``precision``'s graph after checking its files' sha256."""
        folder = Path(folder)
        entry = self.precisions.get(precision)
        if entry is None:
            raise ModelNotFoundError(
                f"package '{self.name}' has no {precision} graph; it has "
                f"{', '.join(self.precisions)}",
                hint="re-run `edgemesh import` (int8 needs --calibration or falls back to dynamic)",
            )
        for rel, digest in self.files.items():
            if rel == entry.file or rel.startswith(entry.file + "."):
                path = folder / rel
                if not path.is_file():
                    raise CorruptArtifactError(str(path), "the file is missing")
                if sha256_file(path) != digest:
                    raise CorruptArtifactError(str(path), "sha256 does not match graph.json")
        return folder / entry.file


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_graph_package(path: Path | str) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / MANIFEST).is_file()
