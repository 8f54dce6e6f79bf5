"""The mesh's deployed-model records, kept so they survive a head change.

The live copy sits in the head's Ray GCS (internal KV, namespace
``edgemesh``, key ``deployments``); every box's agent mirrors it into its
own ``deployments.json`` every second or so. When the head is lost, the new
head's agent seeds the new GCS from its mirror, and the router re-deploys
what it lists. Any box may write (``DeploymentStore.put``); the copy with
the higher ``version`` wins, ties broken by ``updated``.

The record format per model is the router's business; this module only
stores ``{"version", "updated", "models": {name: record}}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from edgemesh.mesh.config import read_json, write_json

log = logging.getLogger(__name__)

KV_KEY = "deployments"
RAY_NAMESPACE = "edgemesh"
"""The Ray namespace of the records (and of the router's named actors)."""


def _empty() -> dict[str, Any]:
    return {"version": 0, "updated": 0.0, "models": {}}


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Is ``a`` newer than ``b``?"""
    return (a.get("version", 0), a.get("updated", 0.0)) > (
        b.get("version", 0),
        b.get("updated", 0.0),
    )


class DeploymentStore:
    """This box's copy of the deployment records (``deployments.json``)."""

    _lock = threading.Lock()  # one writer at a time within a process

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        doc = read_json(self.path)
        if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
            return _empty()
        return doc

    def models(self) -> dict[str, Any]:
        return dict(self.load()["models"])

    def replace(self, doc: dict[str, Any]) -> None:
        write_json(self.path, doc)

    def put(self, name: str, record: dict[str, Any]) -> None:
        """Add or change one model's record (the agent spreads it)."""
        with self._lock:
            doc = self.load()
            doc["models"][name] = record
            self._bump(doc)

    def remove(self, name: str) -> None:
        with self._lock:
            doc = self.load()
            if doc["models"].pop(name, None) is not None:
                self._bump(doc)

    def _bump(self, doc: dict[str, Any]) -> None:
        doc["version"] = int(doc.get("version", 0)) + 1
        doc["updated"] = time.time()
        self.replace(doc)


def sync(store: DeploymentStore, kv_get: Any, kv_put: Any) -> str:
    """Reconcile the local copy with the head's KV; returns what happened
    ("pulled", "pushed" or "same"). ``kv_get``/``kv_put`` are the GCS calls."""
    local = store.load()
    raw = kv_get(KV_KEY)
    remote = _empty()
    if raw:
        try:
            remote = json.loads(raw)
        except ValueError:
            log.warning("the head's deployment records are not JSON; replacing them")
    if _newer(remote, local):
        store.replace(remote)
        return "pulled"
    if _newer(local, remote):
        kv_put(KV_KEY, json.dumps(local).encode())
        return "pushed"
    return "same"


# -- the live copy in the head's Ray GCS (``ray`` is the imported module) ----


def read_records(ray: Any) -> dict[str, Any]:
    """The mesh's records as the head's GCS holds them now."""
    raw = ray.experimental.internal_kv._internal_kv_get(KV_KEY, namespace=RAY_NAMESPACE)
    if not raw:
        return _empty()
    return json.loads(raw)


def write_records(ray: Any, doc: dict[str, Any], state_dir: Path | None) -> None:
    """Store ``doc`` as the next version, in the GCS and (with ``state_dir``)
    in this box's ``deployments.json`` at once."""
    doc["version"] = int(doc.get("version", 0)) + 1
    doc["updated"] = time.time()
    ray.experimental.internal_kv._internal_kv_put(
        KV_KEY, json.dumps(doc).encode(), overwrite=True, namespace=RAY_NAMESPACE
    )
    if state_dir is not None:
        DeploymentStore(Path(state_dir) / "deployments.json").replace(doc)


def record_stages(ray: Any, name: str, stages: list[dict[str, Any]], plan: dict[str, Any]) -> None:
    """Keep model ``name``'s record in step with where its stages run now, so
    `edgemesh status` shows it and a new head re-deploys the current plan."""
    doc = read_records(ray)
    record = doc["models"].get(name)
    if record is None:
        return
    record["stages"] = [
        {k: st[k] for k in ("box", "layers", "backend", "precision")} for st in stages
    ]
    record["plan"] = plan
    write_records(ray, doc, None)
