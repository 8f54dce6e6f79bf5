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
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

from edgemesh import paths
from edgemesh.errors import CorruptArtifactError, ModelNotFoundError
from edgemesh.mesh.deployment_record import PackageRef
from edgemesh.sharding.package.manifest import MANIFEST_NAME, verify_artifact

if TYPE_CHECKING:
    from ray.actor import ActorHandle

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


def cache_folder(cache_root: Path, package: PackageRef) -> Path:
    """``<cache_root>/<model>-<manifest sha>``: one folder per exact manifest."""
    return Path(cache_root) / f"{_slug(package.name)}-{manifest_digest(package.manifest_bytes)}"


def local_copy_ok(folder: Path, package: PackageRef, needed: Iterable[str]) -> bool:
    """Does ``folder`` hold this exact manifest and intact copies of ``needed``?"""
    try:
        if (Path(folder) / MANIFEST_NAME).read_bytes() != package.manifest_bytes:
            return False
        for rel in needed:
            verify_artifact(Path(folder), package.manifest.artifact(rel))
    except (OSError, ValueError, CorruptArtifactError, ModelNotFoundError):
        return False
    except Exception as exc:  # a ModelError for an unknown path: the folder is not ours
        log.debug("local copy at %s rejected: %s", folder, exc)
        return False
    return True


def ensure_artifacts(
    package: PackageRef,
    needed: Iterable[str],
    cache_root: Path,
    read: ReadChunk,
) -> Path:
    """A folder on this box holding the manifest and verified copies of ``needed``.

    Files already cached and intact are kept; the rest are fetched with
    ``read``. Raises ``CorruptArtifactError`` naming the file when a fetched
    copy does not match its sha256 (the source's copy is bad).
    """
    manifest_bytes = package.manifest_bytes
    folder = cache_folder(cache_root, package)
    folder.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for rel in needed:
        art = package.manifest.artifact(rel)
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
        log.info("fetched %d bytes of '%s' into %s", fetched, package.name, folder)
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
        self.package = PackageRef.from_folder(self.root)
        self._allowed = set(self.package.all_files())

    def manifest(self) -> bytes:
        return self.package.manifest_bytes

    def read(self, rel: str, offset: int, size: int) -> bytes:
        if rel not in self._allowed:
            raise ModelNotFoundError(f"'{rel}' is not an artifact of this package")
        with open(self.root / rel, "rb") as fh:
            fh.seek(offset)
            return fh.read(min(size, CHUNK))


class MirrorSource(ArtifactSource):
    """An ``ArtifactSource`` that first copies a whole package from another
    source into this box's cache, so the package outlives the box it came from."""

    def __init__(self, package: PackageRef, upstream: Source, box_id: str) -> None:
        folder = ensure_artifacts(
            package, package.all_files(), default_cache_root(box_id), source_reader(upstream)
        )
        super().__init__(str(folder))


class ChunkSource(Protocol):
    """What serves a package's files: an ``ArtifactSource``, or a Ray actor
    handle of one (whose ``read`` has ``.remote``)."""

    def read(self, rel: str, offset: int, size: int) -> bytes: ...


Source: TypeAlias = "ChunkSource | ActorHandle[ArtifactSource]"
"""An artifact source in this process, or the handle of one running as a Ray actor."""


def source_reader(source: Source) -> ReadChunk:
    """A chunk reader over an ``ArtifactSource``: a Ray actor handle or a local object."""
    remote = getattr(getattr(source, "read", None), "remote", None)
    if remote is None:
        return source.read  # a local ArtifactSource (a handle's read has .remote)
    import ray

    return lambda rel, offset, size: ray.get(remote(rel, offset, size))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "x"
