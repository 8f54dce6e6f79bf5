"""edgemesh: turn a room of mismatched edge boxes into one LLM serving mesh.

Importing this package is cheap on purpose: no inference runtime, Ray or
zeroconf is imported until the code that needs it runs.
"""

from pathlib import Path as _Path
from typing import Any

__version__ = "0.1.0"

# A clone run in place (`python -m edgemesh` in the clone's root imports this
# folder, not the installed package): pyproject maps edgemesh.backends, .mesh,
# .sharding and .bench in from the clone's top-level folders of the same
# names, so look for subpackages there too. Installed packages hold those
# folders inside edgemesh/ and skip this.
_here = _Path(__file__).resolve().parent
if not (_here / "backends").is_dir() and (_here.parent / "backends" / "registry.py").is_file():
    __path__.append(str(_here.parent))
del _here, _Path

__all__ = ["AsyncClient", "Client", "__version__"]

_LAZY = {"Client": "edgemesh.sdk.client", "AsyncClient": "edgemesh.sdk.client"}


def __getattr__(name: str) -> Any:
    # The SDK (httpx, numpy) loads on first use of edgemesh.Client, not on import.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgemesh' has no attribute '{name}'")
