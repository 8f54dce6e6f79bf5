"""edgemesh: turn a room of mismatched edge boxes into one LLM serving mesh.

Importing this package is cheap on purpose: no inference runtime, Ray or
zeroconf is imported until the code that needs it runs.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]

_LAZY = {"Client": "edgemesh.sdk.client", "AsyncClient": "edgemesh.sdk.client"}


def __getattr__(name: str) -> Any:
    # The SDK (httpx, numpy) loads on first use of edgemesh.Client, not on import.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgemesh' has no attribute '{name}'")
