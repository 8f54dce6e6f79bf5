"""Bring the mesh gateway back after a head change (``edgemesh deploy --restore``).

The gateway, its stage actors and the package mirror all live in the head's
Ray cluster, so they end with the head. The deployment records survive: the
agents mirror them into every box's ``deployments.json``, and the new head's
agent seeds the new cluster's KV from its copy (``edgemesh.mesh.deployments``).
``restore`` re-deploys what the records list:

1. for each model, a box holding an intact whole copy of the package (the
   box that deployed it, at its path; or any box whose artifact cache is
   complete, e.g. an earlier head's mirror) serves it to a new mirror on the
   new head;
2. the gateway starts on the new head with the recorded plan; stages whose
   box is gone are re-planned over the boxes alive (as after any loss).

A model no box holds whole is skipped with an error naming it (re-run
``edgemesh deploy`` from a box that has the package). Live streams of the
old gateway are cut: they ran in the lost head's processes.

With ``gateway=True`` (``edgemesh join --gateway``) the gateway starts even
when the records list no model, so a fresh mesh's dashboard is there to
deploy the first one from the page.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from edgemesh.errors import MeshError, ModelUnavailableError, RecordError, require
from edgemesh.mesh.deployment_record import DeploymentRecord, PackageRef
from edgemesh.reexec import edgemesh_argv
from edgemesh.router.profiles import MeshBox

if TYPE_CHECKING:
    from edgemesh.mesh.deployments import DeploymentStore, RecordsJSON


class Restored(TypedDict):
    """What ``restore`` did (``edgemesh deploy --restore --json`` prints it)."""

    gateway: str | None
    restored: list[str]
    skipped: dict[str, str]


log = logging.getLogger(__name__)


def _whole_copy(box: str, package: PackageRef, candidates: list[str]) -> str | None:
    """On ``box``: the first of ``candidates`` (or the box's cache) holding the whole package."""
    from edgemesh.router.artifacts import cache_folder, default_cache_root, local_copy_ok

    cached = cache_folder(default_cache_root(box), package)
    everything = package.all_files()
    for folder in [*candidates, str(cached)]:
        if folder and local_copy_ok(Path(folder), package, everything):
            return folder
    return None


def find_whole_copy(
    ray: Any, record: DeploymentRecord, boxes: list[MeshBox]
) -> tuple[str, str] | None:
    """(box, path) of an intact whole copy of ``record``'s package, or None."""
    task = ray.remote(_whole_copy)
    package = record.package
    origin = package.origin_box
    order = sorted(boxes, key=lambda b: (b.id != origin, not b.is_head, b.id))
    refs = [
        task.options(resources={f"box:{b.id}": 0.001}, num_cpus=0).remote(
            b.id, package, [package.path] if b.id == origin else []
        )
        for b in order
    ]
    for box, ref in zip(order, refs, strict=True):
        try:
            found = ray.get(ref, timeout=120)
        except Exception as exc:  # a box that cannot answer holds nothing we can use
            log.info("box %s could not be searched: %r", box.id, exc)
            continue
        if found:
            return box.id, found
    return None


def restore(
    state_dir: Path | None = None,
    *,
    port: int | None = None,
    gateway: bool = False,
    host: str | None = None,
    api_keys: list[str] | tuple[str, ...] = (),
) -> Restored:
    """Re-deploy every recorded model onto the current head; returns
    ``{"gateway": url, "restored": [names], "skipped": {name: why}}``. A
    record this version cannot read (another format version) is skipped
    with its error and kept as it is in the records.

    ``gateway``: start the gateway (its dashboard and management API) even
    with nothing to restore; ``host`` and ``api_keys`` then bind and guard it
    as ``edgemesh deploy --host/--api-key`` would (kept in the records)."""
    ray = require("ray", "mesh")
    from edgemesh.mesh.deployments import read_records, write_records
    from edgemesh.router.artifacts import Source
    from edgemesh.router.deploy import (
        LOOPBACK,
        MESH_HOST,
        NAMESPACE,
        gateway_bind,
        gateway_keys,
        key_digests,
    )
    from edgemesh.router.mirror import SOURCE_PREFIX, mirror_package
    from edgemesh.router.profiles import mesh_boxes
    from edgemesh.router.serve import start_gateway

    if not ray.is_initialized():
        raise MeshError("not connected to the mesh's Ray", hint="run `edgemesh join` first")
    doc = read_records(ray)
    if state_dir is not None:
        from edgemesh.mesh.deployments import DeploymentStore, _newer

        local = DeploymentStore(Path(state_dir) / "deployments.json").load()
        if _newer(local, doc):
            doc = local
    if not doc.get("models") and not doc.get("graphs") and not gateway:
        return {"gateway": None, "restored": [], "skipped": {}}
    if api_keys:
        doc["api_key_sha256"] = key_digests(api_keys)
    if host is not None or ("gateway_host" not in doc and not doc.get("models")):
        # A fresh mesh: the safe default of `edgemesh deploy` (loopback unless keyed).
        doc["gateway_host"] = host or (MESH_HOST if doc.get("api_key_sha256") else LOOPBACK)
    boxes = _wait_for_boxes(ray, state_dir, mesh_boxes)
    head = next((b for b in boxes if b.is_head), None)
    if head is None:
        raise MeshError("the mesh's Ray cluster has no live head box with a box:<id> resource")
    port = port or _recorded_port(doc) or 8000
    # Records from before --host bound the mesh address: keep that for them.
    bind, shown = gateway_bind(doc.get("gateway_host", MESH_HOST), head.address, keyed=True)
    url = f"http://{shown}:{port}/v1"
    restored: list[str] = []
    skipped: dict[str, str] = {}
    records: list[DeploymentRecord] = []
    for name, raw in sorted(doc["models"].items()):
        try:
            record = DeploymentRecord.from_dict(raw)
        except RecordError as exc:
            skipped[name] = str(exc)
            log.error("%s", skipped[name])
            continue
        found = find_whole_copy(ray, record, boxes)
        if found is None:
            skipped[name] = str(
                ModelUnavailableError(
                    f"no box of the mesh holds a whole copy of '{name}' any more",
                    hint="run `edgemesh deploy` again from a box that has the package",
                )
            )
            log.error("%s", skipped[name])
            continue
        mirror_package(
            ray,
            name,
            record.package,
            source_box=found[0],
            path=found[1],
            head=head.id,
        )
        record = replace(record, gateway=url)
        doc["models"][name] = record.to_dict()
        records.append(record)
        restored.append(name)
    from edgemesh.router.graph_deploy import restore_graphs

    # Graph models' replicas first: the gateway opens what the records list.
    graphs = restore_graphs(ray, doc, boxes, url, state_dir)
    skipped.update(graphs["skipped"])
    if graphs["restored"] and not (restored or gateway):
        gateway = True  # the gateway serves them on /v2
    if restored or gateway:
        sources: dict[str, Source] = {
            n: ray.get_actor(f"{SOURCE_PREFIX}{n}", namespace=NAMESPACE) for n in restored
        }
        keys = gateway_keys(doc.get("api_key_sha256") or [])
        start_gateway(records, head.id, sources, host=bind, port=port, api_keys=keys)
        doc["gateway"] = url
        write_records(ray, doc, state_dir)
    started = bool(restored or gateway)
    restored += graphs["restored"]
    return Restored(gateway=url if started else None, restored=restored, skipped=skipped)


def _wait_for_boxes(
    ray: Any,
    state_dir: Path | None,
    mesh_boxes: Callable[[Any], list[MeshBox]],
    timeout_s: float = 60.0,
) -> list[MeshBox]:
    """The mesh's boxes with Ray nodes, once every box the agent lists has
    its node up (or ``timeout_s`` passed): after a head change
    the survivors re-join the new head one by one, and placing before they
    are back would squeeze the model onto too few boxes."""
    deadline = time.monotonic() + timeout_s
    while True:
        boxes = mesh_boxes(ray)
        if state_dir is None or time.monotonic() > deadline:
            return boxes
        try:
            from edgemesh.mesh import read_status

            listed = {b.id for b in read_status(Path(state_dir)).boxes}
        except Exception as exc:  # no agent view: place over what Ray shows
            log.info("no agent status to wait on: %r", exc)
            return boxes
        if listed <= {b.id for b in boxes}:
            return boxes
        time.sleep(1.0)


def _recorded_port(doc: RecordsJSON) -> int | None:
    from urllib.parse import urlparse

    url = doc.get("gateway") or next(
        (m.get("gateway") for m in doc.get("models", {}).values() if m.get("gateway")), None
    )
    return urlparse(url).port if url else None


def spawn_restore(
    state_dir: Path, store: DeploymentStore, gateway_args: list[str] | None = None
) -> subprocess.Popen[bytes] | None:
    """For the agent of a box that just became head: run ``edgemesh deploy
    --restore`` in the background when its records list models, or always
    with ``gateway_args`` (``edgemesh join --gateway``: start the gateway
    with whatever is recorded, nothing included; the list is passed on, e.g.
    ``["--host", "mesh"]``). Log: ``<state>/restore.log``. Returns the
    process, or None when nothing to do."""
    try:
        if not store.models() and not store.load().get("graphs") and gateway_args is None:
            return None
    except Exception as exc:  # unreadable records: nothing to restore from
        log.warning("cannot read the deployment records: %r", exc)
        if gateway_args is None:
            return None
    argv = edgemesh_argv("deploy", "--restore", "--state-dir", str(state_dir))
    if gateway_args is not None:
        argv += ["--gateway", *gateway_args]
    with open(Path(state_dir) / "restore.log", "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    log.info("restoring the deployed models in the background (pid %d)", proc.pid)
    return proc


def on_head(
    state_dir: Path, store: DeploymentStore, *, gateway_args: list[str] | None = None
) -> Callable[[], None] | None:
    """The mesh agent's on-head hook (``Agent(on_head=...)``): start the
    restore, and return what stops it when the agent leaves."""
    proc = spawn_restore(state_dir, store, gateway_args)
    return None if proc is None else (lambda: stop_restore(proc))


def stop_restore(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a restore still running when the agent leaves."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
