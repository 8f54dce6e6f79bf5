"""A graph model's replica on one box of the mesh: the Ray actor, and the gateway's handle on it.

``GraphReplicaActor`` runs pinned to its box (``box:<id>`` resource, as LLM
stages are). ``load`` gets the package onto the box (the deploying box's own
folder when its files are intact there, else fetched from a ``GraphSource``
into the box's cache, every file checked against ``graph.json``'s sha256
before it is used) and opens it with ``load_graph_service``: this box's
engine and precision within the accuracy budget (``graph.select``), its
engine's accuracy and batch-1 p50 measured here. ``infer`` goes through the
service's dynamic batcher (an async actor, so requests arriving together
share a batch). A box that cannot serve the model says why instead of
raising, so the deploy can name the reason per box.

``ActorReplica`` is the gateway's side, a ``ReplicaSet`` member like
``RemoteReplica`` is for an HTTP box: a dead actor or node, or no answer in
``timeout_s``, is ``ReplicaLost`` (the set retries on another replica); the
client's errors (bad tensor 400, full queue 429) come back as they were.
``open_graph_sets`` builds the /v2 models of the mesh gateway from the
records' ``graphs`` (``edgemesh.router.graph_deploy``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import (
    CorruptArtifactError,
    EdgemeshError,
    ModelNotFoundError,
    OverloadedError,
    RequestError,
    TensorError,
)
from edgemesh.graph.manifest import MANIFEST, GraphManifest, sha256_file
from edgemesh.graph.replicas import ReplicaLost, ReplicaSet
from edgemesh.mesh.deployments import RAY_NAMESPACE as NAMESPACE
from edgemesh.router.artifacts import CHUNK, _slug, default_cache_root, manifest_digest

log = logging.getLogger(__name__)

REPLICA_PREFIX = "edgemesh-graph-"
"""Name prefix of the replica actors (``<prefix><model>@<box>``)."""
INFER_TIMEOUT_S = 30.0


def actor_name(model: str, box: str) -> str:
    return f"{REPLICA_PREFIX}{model}@{box}"


def cache_folder(box: str, manifest_bytes: bytes) -> Path:
    """``<box cache>/graph-<name>-<graph.json sha>``: one folder per exact package."""
    name = json.loads(manifest_bytes).get("name", "graph")
    return default_cache_root(box) / f"graph-{_slug(name)}-{manifest_digest(manifest_bytes)}"


def intact_copy(folder: Path, manifest_bytes: bytes) -> bool:
    """Does ``folder`` hold this exact ``graph.json`` and every file it lists, intact?"""
    try:
        if (Path(folder) / MANIFEST).read_bytes() != manifest_bytes:
            return False
        files = json.loads(manifest_bytes).get("files") or {}
        return all(
            (Path(folder) / rel).is_file() and sha256_file(Path(folder) / rel) == digest
            for rel, digest in files.items()
        )
    except (OSError, ValueError):
        return False


def whole_copy_on_box(box: str, manifest_bytes: bytes, candidates: list[str]) -> str | None:
    """On ``box`` (a pinned Ray task): the first of ``candidates`` or the box's
    cache holding the whole package, or None."""
    for folder in [*candidates, str(cache_folder(box, manifest_bytes))]:
        if folder and intact_copy(Path(folder), manifest_bytes):
            return folder
    return None


class GraphSource:
    """Serves a graph package's files in chunks; a Ray actor on the box that has them.
    Only files ``graph.json`` lists are served."""

    def __init__(self, folder: str) -> None:
        self.root = Path(folder)
        self.manifest_bytes = (self.root / MANIFEST).read_bytes()
        self._allowed = set(json.loads(self.manifest_bytes).get("files") or {})

    def manifest(self) -> bytes:
        return self.manifest_bytes

    def read(self, rel: str, offset: int, size: int) -> bytes:
        if rel not in self._allowed:
            raise ModelNotFoundError(f"'{rel}' is not a file of this graph package")
        with open(self.root / rel, "rb") as fh:
            fh.seek(offset)
            return fh.read(min(size, CHUNK))


def fetch_package(manifest_bytes: bytes, box: str, source: Any) -> Path:
    """A folder on this box with the whole package, fetched from ``source`` (a
    ``GraphSource`` actor handle) where the cache lacks a file or holds a bad one.
    ``graph.json`` is written last: with it in place the copy is whole."""
    import ray

    folder = cache_folder(box, manifest_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    files = json.loads(manifest_bytes).get("files") or {}
    for rel, digest in sorted(files.items()):
        path = folder / rel
        if path.is_file() and sha256_file(path) == digest:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                offset = 0
                while True:
                    block = ray.get(source.read.remote(rel, offset, CHUNK))
                    h.update(block)
                    out.write(block)
                    offset += len(block)
                    if len(block) < CHUNK:
                        break
            if h.hexdigest() != digest:
                raise CorruptArtifactError(
                    rel, f"fetched copy has sha256 {h.hexdigest()[:12]}… != {digest[:12]}…"
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    fd, tmp = tempfile.mkstemp(prefix=".write-", dir=folder)
    with os.fdopen(fd, "wb") as out:
        out.write(manifest_bytes)
    os.replace(tmp, folder / MANIFEST)
    return folder


class GraphReplicaActor:
    """One box's replica (run with ``ray.remote``, pinned to the box)."""

    def __init__(
        self,
        name: str,
        box: str,
        manifest_bytes: bytes,
        source: Any,
        local_path: str,
        max_accuracy_loss: float,
        threads: int | None = None,
    ) -> None:
        self.name = name
        self.box = box
        self.manifest_bytes = manifest_bytes
        self.source = source
        self.local_path = local_path
        self.max_accuracy_loss = max_accuracy_loss
        self.threads = threads
        self.service: Any = None
        self.fetched = False

    async def load(self) -> dict[str, Any]:
        """Open the package on this box: its info (backend, precision, measured
        p50...), or ``{"refused": why}`` when this box cannot serve it."""
        # Off the actor's event loop: the fetch waits on the source, the load compiles.
        return await asyncio.to_thread(self._load)

    def _load(self) -> dict[str, Any]:
        from edgemesh.graph.service import GraphServeOptions, load_graph_service

        try:
            folder = Path(self.local_path) if self.local_path else None
            if folder is None or not intact_copy(folder, self.manifest_bytes):
                folder = fetch_package(self.manifest_bytes, self.box, self.source)
                self.fetched = True
            self.source = None  # the deploy kills it once every box has loaded
            self.service = load_graph_service(
                folder,
                GraphServeOptions(
                    name=self.name, max_accuracy_loss=self.max_accuracy_loss, threads=self.threads
                ),
            )
        except EdgemeshError as exc:
            return {"refused": str(exc)}
        return self.info()

    def info(self) -> dict[str, Any]:
        return {"box": self.box, "fetched": self.fetched, **self.service.info}

    async def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """``{"outputs": {name: array}, "depth": n}`` or ``{"error": {...}}`` for the
        client's errors (rebuilt by ``ActorReplica``; exceptions with their own
        constructors do not survive Ray's pickling)."""
        try:
            outputs = await self.service.infer(feeds)
        except RequestError as exc:
            return {
                "error": {
                    "status": exc.status,
                    "message": str(exc),
                    "param": exc.param,
                    "retry_after_s": getattr(exc, "retry_after_s", None),
                }
            }
        return {"outputs": outputs, "depth": self.service.queue_depth}

    def close(self) -> None:
        if self.service is not None:
            self.service.close()


@dataclass
class ActorReplica:
    """A ``ReplicaSet`` member served by a ``GraphReplicaActor`` on ``box``."""

    box: str
    actor: Any
    timeout_s: float = INFER_TIMEOUT_S
    in_flight: int = 0
    reported_depth: int = 0
    down_until: float = 0.0
    served: int = 0

    @property
    def url(self) -> str:
        return f"box:{self.box}"

    @property
    def queue_depth(self) -> int:
        return self.in_flight + self.reported_depth

    async def infer(self, feeds: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        import ray

        self.in_flight += 1
        try:
            reply = await asyncio.wait_for(_awaited(self.actor.infer.remote(feeds)), self.timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:  # the box is lost
            text = str(exc).strip().splitlines()
            raise ReplicaLost(
                f"box {self.box}: {type(exc).__name__}: {text[-1][:300] if text else ''}"
            ) from exc
        finally:
            self.in_flight -= 1
        if "error" in reply:
            raise _client_error(self.box, reply["error"])
        self.reported_depth = int(reply.get("depth", 0))
        self.served += 1
        return reply["outputs"]


async def _awaited(ref: Any) -> Any:
    return await ref


def _client_error(box: str, err: dict[str, Any]) -> RequestError:
    message = f"replica on box {box}: {err.get('message')}"
    status = int(err.get("status") or 400)
    if status == 429:
        return OverloadedError(message, retry_after_s=float(err.get("retry_after_s") or 1.0))
    if status == 400:
        return TensorError(message, param=err.get("param"))
    out = RequestError(message, param=err.get("param"))
    out.status = status
    return out


def open_graph_sets(ray: Any, graphs: dict[str, Any]) -> list[ReplicaSet]:
    """The mesh gateway's /v2 models: one ``ReplicaSet`` per graph record whose
    replica actors are alive (a record with none is logged and left out)."""
    sets = []
    for name, record in sorted(graphs.items()):
        try:
            manifest = GraphManifest.from_dict(json.loads(record["manifest"]))
        except (KeyError, ValueError, TypeError) as exc:
            log.error("graph record '%s' is unreadable: %r", name, exc)
            continue
        replicas = []
        for r in record.get("replicas", []):
            try:
                actor = ray.get_actor(r["actor"], namespace=NAMESPACE)
            except ValueError:
                log.warning("graph '%s': the replica on %s is gone", name, r.get("box"))
                continue
            replicas.append(ActorReplica(r["box"], actor))
        if not replicas:
            log.error("graph '%s' has no live replica; not served", name)
            continue
        sets.append(ReplicaSet(name, manifest, replicas))
    return sets
