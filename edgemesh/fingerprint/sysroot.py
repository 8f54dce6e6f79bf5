"""Read a box's system files, all relative to a root folder.

The root is ``/`` on the live box, or a snapshot folder copied from another
box (tests use snapshots of real boards). Nothing here falls back to the
running machine: callers decide that, and only when ``is_live``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from edgemesh.errors import FingerprintError


class Sysroot:
    """A folder that stands for ``/`` of the box being fingerprinted."""

    def __init__(self, root: Path | str = Path("/")) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FingerprintError(
                f"sysroot '{self.root}' is not a folder",
                hint="pass --sysroot a folder laid out like / (with proc/ and sys/)",
            )
        self.is_live = self.root.resolve() == Path("/")

    def path(self, abs_path: str) -> Path:
        """Where ``abs_path`` (e.g. ``/proc/cpuinfo``) lives under the root."""
        return self.root / abs_path.lstrip("/")

    def read(self, abs_path: str) -> str | None:
        """The file's text, or None when it is absent or unreadable.

        Unreadable counts as absent on purpose: debugfs and some sysfs files
        are root-only, and a fingerprint taken as a normal user must still
        work from what it can see.
        """
        try:
            return self.path(abs_path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            return None
        except OSError:
            # Some sysfs attributes fail with EINVAL/EIO when the device is
            # asleep; that says nothing about the hardware we want to list.
            return None

    def read_strip(self, abs_path: str) -> str | None:
        """Like ``read`` but without surrounding whitespace and NUL bytes
        (device-tree strings end in NUL); empty counts as absent."""
        text = self.read(abs_path)
        if text is None:
            return None
        text = text.strip().strip("\x00").strip()
        return text or None

    def read_nul_list(self, abs_path: str) -> list[str]:
        """A device-tree string list (NUL-separated), e.g. ``compatible``."""
        text = self.read(abs_path)
        if not text:
            return []
        return [item.strip() for item in text.split("\x00") if item.strip()]

    def exists(self, abs_path: str) -> bool:
        return self.path(abs_path).exists()

    def glob(self, abs_dir: str, pattern: str) -> Iterator[Path]:
        """Sorted matches of ``pattern`` inside ``abs_dir`` under the root."""
        base = self.path(abs_dir)
        if not base.is_dir():
            return iter(())
        try:
            return iter(sorted(base.glob(pattern)))
        except OSError:
            return iter(())

    def relative(self, path: Path) -> str:
        """The absolute path on the box of a file found under the root."""
        return "/" + str(path.relative_to(self.root)).lstrip("/")
