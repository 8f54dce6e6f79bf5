"""The mesh's deployed-model records, kept so they survive a head change.

The live copy sits in the head's Ray GCS (internal KV, namespace
``edgemesh``, key ``deployments``); every box's agent mirrors it into its
own ``deployments.json`` every second or so. When the head is lost, the new
head's agent seeds the new GCS from its mirror, and the router re-deploys
what it lists. Any box may write (``DeploymentStore.put``); the copy with
the higher ``version`` wins, ties broken by ``updated``.

The records are typed (``edgemesh.mesh.deployment_record``): ``load`` /
``save`` parse and write a ``Deployments`` document. The agent's sync and
``read_records``/``write_records`` move the raw JSON (``RecordsJSON``)
without parsing it, so a box mirrors records it could not read itself
(another format version) instead of dropping them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from edgemesh.mesh.config import read_json, write_json
from edgemesh.mesh.deployment_record import (
    DeploymentRecord,
    Deployments,
    JSONObject,
    StageInfo,
)

if TYPE_CHECKING:
    from edgemesh.sharding.planner.plan import Plan

log = logging.getLogger(__name__)

KV_KEY = "deployments"
RAY_NAMESPACE = "edgemesh"
"""The Ray namespace of the records (and of the router's named actors)."""

RecordsJSON: TypeAlias = JSONObject
"""The records document as JSON (``Deployments.to_dict``), unparsed."""

KVGet: TypeAlias = Callable[[str], bytes | None]
KVPut: TypeAlias = Callable[[str, bytes], object]


def _empty() -> RecordsJSON:
    return {"version": 0, "updated": 0.0, "models": {}}


def _newer(a: RecordsJSON, b: RecordsJSON) -> bool:
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

    def load(self) -> RecordsJSON:
        """The document as stored (unparsed; an empty one when there is none)."""
        doc = read_json(self.path)
        if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
            return _empty()
        return doc

    def deployments(self) -> Deployments:
        """The parsed document; raises ``RecordError``/``RecordVersionError``."""
        return Deployments.from_dict(self.load())

    def models(self) -> dict[str, RecordsJSON]:
        """Each model's record, unparsed (enough to tell whether any is kept)."""
        return dict(self.load()["models"])

    def replace(self, doc: RecordsJSON) -> None:
        write_json(self.path, doc)

    def put(self, record: DeploymentRecord) -> None:
        """Add or change one model's record (the agent spreads it)."""
        with self._lock:
            doc = self.load()
            doc["models"][record.name] = record.to_dict()
            self._bump(doc)

    def remove(self, name: str) -> None:
        with self._lock:
            doc = self.load()
            if doc["models"].pop(name, None) is not None:
                self._bump(doc)

    def _bump(self, doc: RecordsJSON) -> None:
        doc["version"] = int(doc.get("version", 0)) + 1
        doc["updated"] = time.time()
        self.replace(doc)


def sync(store: DeploymentStore, kv_get: KVGet, kv_put: KVPut) -> str:
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


def read_records(ray: Any) -> RecordsJSON:
    """The mesh's records as the head's GCS holds them now (unparsed)."""
    raw = ray.experimental.internal_kv._internal_kv_get(KV_KEY, namespace=RAY_NAMESPACE)
    if not raw:
        return _empty()
    doc = json.loads(raw)
    return doc if isinstance(doc, dict) and isinstance(doc.get("models"), dict) else _empty()


def write_records(ray: Any, doc: RecordsJSON, state_dir: Path | None) -> None:
    """Store ``doc`` as the next version, in the GCS and (with ``state_dir``)
    in this box's ``deployments.json`` at once."""
    doc["version"] = int(doc.get("version", 0)) + 1
    doc["updated"] = time.time()
    ray.experimental.internal_kv._internal_kv_put(
        KV_KEY, json.dumps(doc).encode(), overwrite=True, namespace=RAY_NAMESPACE
    )
    if state_dir is not None:
        DeploymentStore(Path(state_dir) / "deployments.json").replace(doc)


def load(ray: Any) -> Deployments:
    """The head's records, parsed (the edge where they enter this process)."""
    return Deployments.from_dict(read_records(ray))


def save(ray: Any, deployments: Deployments, state_dir: Path | None) -> None:
    """Write ``deployments`` as the next revision (see ``write_records``)."""
    doc = deployments.to_dict()
    write_records(ray, doc, state_dir)
    deployments.revision, deployments.updated = doc["version"], doc["updated"]


def record_stages(ray: Any, name: str, stages: Sequence[StageInfo], plan: Plan) -> None:
    """Keep model ``name``'s record in step with where its stages run now, so
    `edgemesh status` shows it and a new head re-deploys the current plan."""
    doc = read_records(ray)
    raw = doc["models"].get(name)
    if raw is None:
        return
    doc["models"][name] = DeploymentRecord.from_dict(raw).moved(stages, plan).to_dict()
    write_records(ray, doc, None)
