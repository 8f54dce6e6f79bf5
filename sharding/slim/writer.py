"""Write a slimmed package beside ``--out`` and rename it into place at the end.

A method never leaves a half-written package: everything goes into a
temporary folder next to the destination (same filesystem, so the final
``os.replace`` is atomic), and a failure removes that folder. Files a method
does not change are copied from the source package, not hard-linked: onnx
refuses to read external weights from a file with several links (its guard
against hard-link attacks), and an edit to one package must not change
another.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.sharding.package.folder import write_piece
from edgemesh.sharding.package.manifest import Artifact, Manifest, sha256_file


def check_out(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``--out`` unless ``overwrite`` (checked before any work)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"'{out}' is not empty", hint="pass --overwrite or another --out")
    return out


class Draft:
    """A package under construction in ``<out parent>/.slim-*``; ``commit`` publishes it."""

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = check_out(out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out)
        self.work = Path(tempfile.mkdtemp(prefix=f".slim-{self.out.name}-", dir=self.out.parent))
        (self.work / "pid").write_text(str(os.getpid()))
        self.root = self.work / "pkg"
        self.root.mkdir()
        self.written: set[str] = set()

    def __enter__(self) -> Draft:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.work, ignore_errors=True)  # after commit it holds nothing of value

    def link(self, source_root: Path, rel: str) -> None:
        """Take ``rel`` unchanged from the source package (a copy)."""
        src, dst = Path(source_root) / rel, self.root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)

    def write(self, model: Any, rel: str) -> list[str]:
        """Save an ONNX piece (``package.write_piece``); returns the files written."""
        target = self.root / rel
        for old in (target, target.with_name(target.name + ".data")):
            if old.exists():  # copied from the source: replaced, not patched
                old.unlink()
        files = write_piece(model, self.root, rel)
        self.written.update(files)
        return files

    def bytes_of(self, files: list[str]) -> int:
        return sum((self.root / f).stat().st_size for f in files)

    def rehash(self, manifest: Manifest) -> Manifest:
        """The manifest's artifacts for what the folder now holds: files written
        here are hashed again, linked ones keep the source's entry, and entries
        whose file is gone (a piece rewritten without a ``.data`` file) drop."""
        arts = []
        for art in manifest.artifacts:
            if art.path not in self.written and (self.root / art.path).is_file():
                arts.append(art)
        for rel in sorted(self.written):
            path = self.root / rel
            arts.append(Artifact(rel, sha256_file(path), path.stat().st_size))
        return replace(manifest, artifacts=arts)

    def commit(self, manifest: Manifest) -> Path:
        """Save the manifest and move the package to ``out`` (replacing an old one)."""
        manifest.save(self.root)
        if self.out.exists():
            old = self.work / "old"
            os.replace(self.out, old)
        os.replace(self.root, self.out)
        return self.out


def _remove_stale(out: Path) -> None:
    """Drop drafts for ``out`` left by a killed run (SIGKILL/SIGTERM skip ``__exit__``):
    those whose recorded process is gone."""
    for folder in out.parent.glob(f".slim-{out.name}-*"):
        try:
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's
