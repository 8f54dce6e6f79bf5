"""``manifest.json``: everything the partitioner and the loaders know of a model.

The partitioner plans from this file alone, so it carries the costs of every
layer at every precision. Artifacts are listed with their sha256 so loaders
detect a missing, truncated or altered file before use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemesh.errors import CorruptArtifactError, ModelError, ModelNotFoundError

FORMAT = "edgemesh-model/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class LayerCost:
    """Costs of one block (a decoder layer, the embedding, or the head)."""

    weight_bytes: dict[str, int]
    """Precision (fp32/fp16/int8/int4) -> bytes of weights at that precision."""
    flops_per_token: int
    """Multiply-adds x 2 for one token at short context (attention excluded)."""
    kv_bytes_per_token: int = 0
    """KV-cache bytes one token adds to this layer (fp32 cache); 0 for embed/head."""
    attn_flops_per_token_per_ctx: int = 0
    """Extra attention FLOPs per token for each token already in context."""


@dataclass(frozen=True)
class Artifact:
    path: str
    """Relative to the package folder, with forward slashes."""
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TokenizerInfo:
    file: str | None
    """tokenizer.json (Hugging Face tokenizers) relative to the package."""
    bos_token_id: int | None
    eos_token_ids: list[int]
    chat_template: str | None
    add_bos: bool = True


@dataclass(frozen=True)
class Manifest:
    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    layers: list[LayerCost]
    embedding: LayerCost
    head: LayerCost
    tokenizer: TokenizerInfo
    artifacts: list[Artifact]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    """Precision -> measured relative perplexity increase vs fp32 (None: not measured)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Architecture details the exporter needs (heads, head_dim, rope...)."""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ModelError(
                f"unsupported manifest format {data.get('format')!r}, expected {FORMAT!r}",
                hint="re-convert the model with this edgemesh version",
            )
        try:
            return cls(
                name=data["name"],
                architecture=data["architecture"],
                num_layers=int(data["num_layers"]),
                hidden_size=int(data["hidden_size"]),
                vocab_size=int(data["vocab_size"]),
                context_length=int(data["context_length"]),
                layers=[LayerCost(**c) for c in data["layers"]],
                embedding=LayerCost(**data["embedding"]),
                head=LayerCost(**data["head"]),
                tokenizer=TokenizerInfo(**data["tokenizer"]),
                artifacts=[Artifact(**a) for a in data["artifacts"]],
                accuracy=dict(data.get("accuracy", {})),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed manifest: {exc}") from exc

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ModelNotFoundError(
                f"no {MANIFEST_NAME} in '{folder}'",
                hint="point at a folder made by `edgemesh convert`",
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptArtifactError(str(path), f"not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def digest(self) -> str:
        """16 hex chars naming this exact conversion: sha256 over the artifacts'
        sha256s. Measurements made on the real model (a box's calibration)
        are keyed by it, so a re-converted or re-quantised model is measured
        again instead of being priced with another model's timings."""
        blob = "\n".join(
            f"{a.path} {a.sha256}" for a in sorted(self.artifacts, key=lambda a: a.path)
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def artifact(self, rel_path: str) -> Artifact:
        for art in self.artifacts:
            if art.path == rel_path:
                return art
        raise ModelError(f"'{rel_path}' is not listed in the manifest of '{self.name}'")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_artifact(folder: Path, art: Artifact) -> Path:
    """Check one artifact's presence, size and sha256; return its path."""
    path = Path(folder) / art.path
    if not path.is_file():
        raise CorruptArtifactError(art.path, "file is missing")
    size = path.stat().st_size
    if size != art.bytes:
        raise CorruptArtifactError(art.path, f"size {size} bytes, manifest says {art.bytes}")
    actual = sha256_file(path)
    if actual != art.sha256:
        raise CorruptArtifactError(art.path, f"sha256 {actual[:12]}… != {art.sha256[:12]}…")
    return path
