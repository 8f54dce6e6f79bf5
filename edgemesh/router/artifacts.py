"""Get a shard's artifacts onto a box: no shared filesystem is assumed.

A stage needs the manifest plus the artifacts of its layer range. If the
package folder it was told about exists on its box and every needed file
matches the manifest's sha256, it is used as is. Otherwise the files are
fetched in chunks from an ``ArtifactSource`` (a Ray actor on the box that
holds the package: the head, or the box that ran ``edgemesh deploy``) into
a per-box cache, ``<cache>/<model>-<manifest sha>/``, each verified by
sha256 before it is moved into place, so a half-copied file is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgemesh import paths
from edgemesh.errors import CorruptArtifactError, ModelNotFoundError
from edgemesh.sharding.package.manifest import MANIFEST_NAME, Manifest, verify_artifact

log = logging.getLogger(__name__)

CHUNK = 4 << 20
"""Bytes per fetch call: large enough to amortise a call, small enough for the object store."""

ReadChunk = Callable[[str, int, int], bytes]
"""``read(rel_path, offset, size) -> bytes`` on the box that holds the package."""


def default_cache_root(box_id: str) -> Path:
    """Per box, so several boxes on one host (namespaces) never share a cache."""
    return paths.box_cache_dir(_slug(box_id)) / "artifacts"


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


def package_files(manifest: Manifest, needed: Iterable[str]) -> list[str]:
    """The artifacts in ``needed`` plus the tokenizer (every stage can decode)."""
    out = list(dict.fromkeys(needed))
    if manifest.tokenizer.file and manifest.tokenizer.file not in out:
        out.append(manifest.tokenizer.file)
    return out


def local_copy_ok(folder: Path, manifest_bytes: bytes, needed: Iterable[str]) -> bool:
    """Does ``folder`` hold this exact manifest and intact copies of ``needed``?"""
    try:
        if (Path(folder) / MANIFEST_NAME).read_bytes() != manifest_bytes:
            return False
        manifest = Manifest.from_dict(json.loads(manifest_bytes))
        for rel in needed:
            verify_artifact(Path(folder), manifest.artifact(rel))
    except (OSError, ValueError, CorruptArtifactError, ModelNotFoundError):
        return False
    except Exception as exc:  # a ModelError for an unknown path: the folder is not ours
        log.debug("local copy at %s rejected: %s", folder, exc)
        return False
    return True


def ensure_artifacts(
    manifest_bytes: bytes,
    needed: Iterable[str],
    cache_root: Path,
    read: ReadChunk,
) -> Path:
    """A folder on this box holding the manifest and verified copies of ``needed``.

    Files already cached and intact are kept; the rest are fetched with
    ``read``. Raises ``CorruptArtifactError`` naming the file when a fetched
    copy does not match its sha256 (the source's copy is bad).
    """
    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    folder = Path(cache_root) / f"{_slug(manifest.name)}-{manifest_digest(manifest_bytes)}"
    folder.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for rel in needed:
        art = manifest.artifact(rel)
        try:
            verify_artifact(folder, art)
            continue
        except CorruptArtifactError:
            pass
        fetched += _fetch_one(folder, rel, art.bytes, art.sha256, read)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file() or manifest_path.read_bytes() != manifest_bytes:
        _atomic_write(manifest_path, manifest_bytes)
    if fetched:
        log.info("fetched %d bytes of '%s' into %s", fetched, manifest.name, folder)
    return folder


def _fetch_one(folder: Path, rel: str, size: int, sha256: str, read: ReadChunk) -> int:
    dest = folder / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            offset = 0
            while offset < size:
                block = read(rel, offset, min(CHUNK, size - offset))
                if not block:
                    raise CorruptArtifactError(rel, f"the source ended at byte {offset} of {size}")
                digest.update(block)
                out.write(block)
                offset += len(block)
        if digest.hexdigest() != sha256:
            raise CorruptArtifactError(
                rel, f"fetched copy has sha256 {digest.hexdigest()[:12]}… != {sha256[:12]}…"
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".write-", dir=path.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


class ArtifactSource:
    """Serves a package's files in chunks; run as a Ray actor on the box that has them.

    Only paths listed in the manifest are served, so a caller cannot read
    anything else on the box.
    """

    def __init__(self, package_dir: str) -> None:
        self.root = Path(package_dir)
        self.manifest_bytes = (self.root / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_dict(json.loads(self.manifest_bytes))
        self._allowed = {a.path for a in manifest.artifacts}

    def manifest(self) -> bytes:
        return self.manifest_bytes

    def read(self, rel: str, offset: int, size: int) -> bytes:
        if rel not in self._allowed:
            raise ModelNotFoundError(f"'{rel}' is not an artifact of this package")
        with open(self.root / rel, "rb") as fh:
            fh.seek(offset)
            return fh.read(min(size, CHUNK))


class MirrorSource(ArtifactSource):
    """An ``ArtifactSource`` that first copies a whole package from another
    source into this box's cache, so the package outlives the box it came from."""

    def __init__(self, manifest_bytes: bytes, upstream: Any, box_id: str) -> None:
        manifest = Manifest.from_dict(json.loads(manifest_bytes))
        folder = ensure_artifacts(
            manifest_bytes,
            [a.path for a in manifest.artifacts],
            default_cache_root(box_id),
            source_reader(upstream),
        )
        super().__init__(str(folder))


def source_reader(source: Any) -> ReadChunk:
    """A chunk reader over an ``ArtifactSource``: a Ray actor handle or a local object."""
    remote = getattr(getattr(source, "read", None), "remote", None)
    if remote is None:
        return source.read
    import ray

    return lambda rel, offset, size: ray.get(remote(rel, offset, size))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "x"
