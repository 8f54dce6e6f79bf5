"""Find backends by name, lazily.

A built-in backend is any module of this package that defines ``BACKEND``
(adding hardware = adding one file). Out-of-tree backends register an entry
point in the ``edgemesh.backends`` group pointing at their class. Both take
the same path: each class says itself whether it suits a box
(``Backend.suits``), and ``ranked`` orders them for the fingerprint, whose
list the planner reads.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points

from edgemesh.backends.base import Backend, BoxFacts
from edgemesh.errors import BackendUnavailableError, ConfigError

_NOT_BACKENDS = {"base", "registry", "graph_base"}


@lru_cache(maxsize=1)
def _builtin() -> dict[str, type[Backend]]:
    import edgemesh.backends as pkg

    found: dict[str, type[Backend]] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _NOT_BACKENDS or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"edgemesh.backends.{info.name}")
        cls = getattr(module, "BACKEND", None)
        if cls is not None:
            found[cls.name] = cls
    return found


def _plugins() -> dict[str, type[Backend]]:
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group="edgemesh.backends"):
        cls = ep.load()
        found[getattr(cls, "name", ep.name)] = cls
    return found


def all_backends() -> dict[str, type[Backend]]:
    """Every known backend class by name, installed or not (sorted)."""
    merged = {**_builtin(), **_plugins()}
    return dict(sorted(merged.items()))


def names() -> list[str]:
    return list(all_backends())


def get(name: str) -> type[Backend]:
    """The backend class called ``name``; raises ConfigError if unknown."""
    backends = all_backends()
    try:
        return backends[name]
    except KeyError:
        raise ConfigError(
            f"unknown backend '{name}'", hint=f"choose one of: {', '.join(backends)}"
        ) from None


def require_available(name: str) -> type[Backend]:
    """Like ``get`` but raises BackendUnavailableError when it cannot run here."""
    cls = get(name)
    reason = cls.available()
    if reason is not None:
        raise BackendUnavailableError(f"backend '{name}' cannot run here: {reason}")
    return cls


def ranked(box: BoxFacts) -> list[str]:
    """The backends that suit ``box``, best first (rank, then name), installed or not."""
    ranks = {name: cls.suits(box) for name, cls in all_backends().items()}
    suited = [(-rank, name) for name, rank in ranks.items() if rank is not None]
    return [name for _, name in sorted(suited)]


def availability() -> dict[str, str | None]:
    """name -> None if usable here, else the reason."""
    return {name: cls.available() for name, cls in all_backends().items()}


# Graph backends (whole fixed graphs: vision and other non-LLM models; see
# graph_base.py) live in modules named graph_*.py that define GRAPH_BACKEND.
# Same registry, separate namespace: a graph backend is named like the
# engine it drives ("onnxruntime", "openvino"...), so the fingerprint's
# backend order applies to both kinds.


@lru_cache(maxsize=1)
def graph_backends() -> dict[str, type]:
    """Every graph backend class by name, installed or not (sorted)."""
    import edgemesh.backends as pkg

    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("graph_") or info.name == "graph_base":
            continue
        module = importlib.import_module(f"edgemesh.backends.{info.name}")
        cls = getattr(module, "GRAPH_BACKEND", None)
        if cls is not None:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def get_graph(name: str) -> type:
    """The graph backend class called ``name``; raises ConfigError if unknown."""
    backends = graph_backends()
    try:
        return backends[name]
    except KeyError:
        raise ConfigError(
            f"unknown graph backend '{name}'", hint=f"choose one of: {', '.join(backends)}"
        ) from None
