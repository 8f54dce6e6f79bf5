"""Hand memory that loading freed back to the operating system.

glibc keeps freed heap pages resident for reuse. Loading leaves a lot of
them: parsing the default model's 33 MB tokenizer.json leaves ~190 MB freed
but resident (measured: 309 MB after loading, 115 MB after a trim), and
building ONNX sessions leaves ~70 MB more. On a 3 GiB box that is memory the
planner gave to KV cache, so every process that loads a model trims once
when it is ready to serve.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def trim() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); False elsewhere
    (musl, macOS), where there is nothing to do."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError as exc:  # a C library that cannot be opened: nothing to trim
        log.debug("malloc_trim unavailable: %s", exc)
        return False
    if fn is None:
        return False
    fn(0)
    return True
