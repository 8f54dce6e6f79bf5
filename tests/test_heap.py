"""edgemesh.heap.trim hands freed heap pages back to the OS (glibc)."""

from __future__ import annotations

import platform

import psutil
import pytest

from edgemesh import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_returns_freed_pages() -> None:
    # Many malloc-sized blocks with a few survivors pinned between them: the
    # freed space is inside the heap, where glibc keeps it until trimmed.
    blocks = [bytes(2048) + bytes([i % 251]) for i in range(100_000)]
    keep = blocks[::200]
    del blocks
    before = psutil.Process().memory_info().rss
    assert heap.trim() is True
    after = psutil.Process().memory_info().rss
    assert len(keep) == 500
    assert before - after > 100 << 20, (before >> 20, after >> 20)
