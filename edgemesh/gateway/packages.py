"""The model packages a box can see, for the dashboard's Models view.

Searched: ``$EDGEMESH_CACHE_DIR/packages`` (``~/.cache/edgemesh/packages``,
where ``default_package`` converts to), every folder of
``$EDGEMESH_PACKAGES`` (``:``-separated) and folders given by the caller
(deployed records). A folder is a package when it holds ``manifest.json``
(an LLM package from ``edgemesh convert``) or ``graph.json`` (a graph model
from ``edgemesh import``); its children one level down are searched too.
Runs on each box (a Ray task on the mesh), so it reads only files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgemesh import paths


def search_roots(extra: Iterable[str] = ()) -> list[Path]:
    roots = paths.package_search_dirs()
    roots += [Path(p) for p in extra if p]
    return roots


def describe(folder: Path) -> dict[str, Any] | None:
    """The package at ``folder`` as the API lists it, or None when it is none."""
    for kind, name in (("llm", "manifest.json"), ("graph", "graph.json")):
        try:
            doc = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        precisions = doc.get("precisions")
        if kind == "llm":  # the precisions the converter exported and measured
            precisions = list(doc.get("accuracy") or {})
        return {
            "name": str(doc.get("name") or folder.name),
            "path": str(folder.resolve()),
            "kind": kind,
            "num_layers": doc.get("num_layers"),
            "context_length": doc.get("context_length"),
            "precisions": sorted(precisions) if isinstance(precisions, (list, dict)) else [],
            "size_bytes": _size(folder),
        }
    return None


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def find_packages(extra: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every package under the search roots, by path, each once."""
    found: dict[str, dict[str, Any]] = {}
    for root in search_roots(extra):
        if not root.is_dir():
            continue
        candidates = [root]
        try:
            candidates += sorted(
                p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        except OSError:
            continue
        for folder in candidates:
            info = describe(folder)
            if info is not None:
                found.setdefault(info["path"], info)
    return sorted(found.values(), key=lambda p: (p["name"], p["path"]))
