"""``edgemesh deploy DIR`` of a graph package: whole-model replicas on the boxes that serve it best.

Graph models are small and answer one frame at a time, so the mesh places
whole copies (data parallel, never sharded):

1. every box of the mesh that is not drained gets a ``GraphReplicaActor``
   (detached, pinned by its ``box:<id>`` resource); each fetches the package
   from a source actor on the deploying box (sha256-checked) unless it is
   that box, then opens it with its own engine and precision within
   ``max_accuracy_loss`` (``graph.select``) and times it (batch-1 p50);
2. ``graph.placement.choose_replicas`` keeps the fastest (``replicas=N``) or
   every box close to the fastest (auto); the others are stopped, and the
   boxes that cannot serve it at all are recorded with their reason;
3. the record goes into the deployment records under ``graphs`` (beside the
   LLM ``models``; ``edgemesh.mesh.deployments``), so ``edgemesh status``
   shows it and a new head restores it;
4. the mesh gateway (Ray Serve on the head) is restarted; it serves every
   graph record on /v2 with the OIP routes of ``edgemesh serve``, balancing
   by queue depth over the replicas (``graph.replicas.ReplicaSet``).

``undeploy_graph`` stops the replicas and drops the record; ``restore_graphs``
(called by ``router.restore`` on a new head) places them again from any box
that still holds a whole copy (the deploying box's folder, or a replica box's
cache).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgemesh.errors import (
    ConfigError,
    EdgemeshError,
    MeshError,
    ModelNotFoundError,
    ModelUnavailableError,
    require,
)
from edgemesh.graph.manifest import MANIFEST, GraphManifest
from edgemesh.graph.select import DEFAULT_MAX_ACCURACY_LOSS
from edgemesh.mesh.deployment_record import GraphRecord
from edgemesh.mesh.deployments import RAY_NAMESPACE as NAMESPACE
from edgemesh.mesh.deployments import read_records, write_records
from edgemesh.router.graph_place import (
    GRAPHS,
    GraphDeployOptions,
    graph_record,
    place_replicas,
    remove_replicas,
)
from edgemesh.router.graph_replica import GraphSource, whole_copy_on_box

__all__ = ["GRAPHS", "GraphDeployOptions", "deploy_graph", "restore_graphs", "undeploy_graph"]

log = logging.getLogger(__name__)


def _source(ray: Any, box: str, folder: str) -> Any:
    return (
        ray.remote(GraphSource)
        .options(resources={f"box:{box}": 0.001}, num_cpus=0, namespace=NAMESPACE)
        .remote(folder)
    )


def deploy_graph(
    package_dir: Path,
    *,
    name: str | None = None,
    here: str,
    options: GraphDeployOptions | None = None,
    port: int = 8000,
    host: str | None = None,
    api_keys: list[str] | tuple[str, ...] = (),
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Place graph package ``package_dir`` (on box ``here``) on the mesh and serve
    it on the mesh gateway's /v2; returns its record. Ray must be connected to
    the mesh (``edgemesh.mesh.connect``); ``host``/``api_keys`` as for
    ``router.deploy.deploy`` (kept in the records)."""
    ray = require("ray", "mesh")
    from edgemesh.router.deploy import LOOPBACK, MESH_HOST, gateway_bind, key_digests
    from edgemesh.router.profiles import mesh_boxes

    options = options or GraphDeployOptions()
    if not ray.is_initialized():
        raise MeshError("not connected to the mesh's Ray", hint="run `edgemesh join` first")
    root = Path(package_dir).expanduser().resolve()
    manifest = GraphManifest.load(root)
    raw = (root / MANIFEST).read_bytes()
    name = name or manifest.name
    doc = read_records(ray)
    if name in doc.get("models", {}):
        raise ConfigError(
            f"'{name}' is already deployed as an LLM on this mesh", hint="pass another --name"
        )
    boxes = mesh_boxes(ray)
    head = next((b for b in boxes if b.is_head), None)
    if head is None:
        raise MeshError("the mesh's Ray cluster has no live head box with a box:<id> resource")
    if here not in {b.id for b in boxes}:
        raise MeshError(f"this box ({here}) has no live Ray node in the mesh")
    drained = set(doc.get("drained", []))
    usable = [b.id for b in boxes if b.id not in drained]
    source = _source(ray, here, str(root))
    try:
        placed = place_replicas(
            ray,
            name,
            raw,
            usable,
            source=source,
            origin_box=here,
            package_dir=str(root),
            options=options,
        )
    finally:
        ray.kill(source)

    doc = read_records(ray)
    if api_keys:
        doc["api_key_sha256"] = key_digests(api_keys)
    if host is not None or "gateway_host" not in doc:
        doc["gateway_host"] = host or (MESH_HOST if doc.get("api_key_sha256") else LOOPBACK)
    bind, shown = gateway_bind(doc["gateway_host"], head.address, keyed=True)
    record = graph_record(
        name,
        raw,
        package_dir=str(root),
        origin_box=here,
        placed=placed,
        options=options,
        gateway=f"http://{shown}:{port}/v2",
    )
    doc.setdefault(GRAPHS, {})[name] = record.to_dict()
    doc["gateway"] = f"http://{shown}:{port}/v1"
    write_records(ray, doc, state_dir)  # before the gateway starts: it opens what they list
    try:
        restart_gateway(ray, doc, head.id, bind, port)
    except BaseException:
        remove_replicas(ray, name, [r["box"] for r in placed.replicas])
        doc = read_records(ray)
        doc.get(GRAPHS, {}).pop(name, None)
        write_records(ray, doc, state_dir)
        raise
    return record.to_dict()


def restart_gateway(ray: Any, doc: dict[str, Any], head: str, bind: str, port: int) -> None:
    """(Re)start the mesh gateway with the records' LLM models (it reads the graphs
    from the records itself), as ``edgemesh deploy`` of an LLM does."""
    from edgemesh.mesh.deployment_record import Deployments
    from edgemesh.router.deploy import gateway_keys
    from edgemesh.router.mirror import SOURCE_PREFIX
    from edgemesh.router.serve import start_gateway

    models = Deployments.from_dict(doc).models
    sources = {n: ray.get_actor(f"{SOURCE_PREFIX}{n}", namespace=NAMESPACE) for n in models}
    start_gateway(
        list(models.values()),
        head,
        sources,
        host=bind,
        port=port,
        api_keys=gateway_keys(doc.get("api_key_sha256") or []),
    )


def undeploy_graph(name: str, state_dir: Path | None = None) -> dict[str, Any]:
    """Stop graph model ``name``'s replicas, drop its record, restart the gateway
    without it; returns the removed record."""
    ray = require("ray", "mesh")
    from urllib.parse import urlparse

    from edgemesh.router.deploy import MESH_HOST, gateway_bind
    from edgemesh.router.profiles import mesh_boxes

    if not ray.is_initialized():
        raise MeshError("not connected to the mesh's Ray", hint="run `edgemesh join` first")
    doc = read_records(ray)
    raw = doc.get(GRAPHS, {}).pop(name, None)
    if raw is None:
        if name in doc.get("models", {}):
            raise ConfigError(
                f"'{name}' is an LLM deployment; `edgemesh undeploy` removes graph models",
                hint="undeploy it from the dashboard or with edgemesh.Client(...).undeploy",
            )
        raise ModelNotFoundError(
            f"no graph model '{name}' is deployed on this mesh; graph models: "
            f"{', '.join(sorted(doc.get(GRAPHS, {}))) or 'none'}"
        )
    record = GraphRecord.from_dict(raw)
    remove_replicas(ray, name, record.boxes)
    write_records(ray, doc, state_dir)
    head = next((b for b in mesh_boxes(ray) if b.is_head), None)
    url = doc.get("gateway") or record.gateway
    if head is not None and url:
        bind, _ = gateway_bind(doc.get("gateway_host", MESH_HOST), head.address, keyed=True)
        restart_gateway(ray, doc, head.id, bind, urlparse(url).port or 8000)
    return record.to_dict()


def find_graph_copy(ray: Any, record: GraphRecord, boxes: list[Any]) -> tuple[str, str] | None:
    """(box, folder) of an intact whole copy of ``record``'s package: the deploying
    box's folder first, then any box's cache (every replica box keeps one)."""
    raw = record.manifest.encode()
    origin = record.origin_box
    task = ray.remote(whole_copy_on_box)
    order = sorted(boxes, key=lambda b: (b.id != origin, b.id))
    refs = [
        task.options(resources={f"box:{b.id}": 0.001}, num_cpus=0).remote(
            b.id, raw, [record.package_dir] if b.id == origin else []
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


def restore_graphs(
    ray: Any, doc: dict[str, Any], boxes: list[Any], gateway_v1: str, state_dir: Path | None
) -> dict[str, Any]:
    """On a new head: place every recorded graph model again and write the
    records (before the gateway starts, which opens them). Returns
    ``{"restored": [names], "skipped": {name: why}}``."""
    graphs = doc.get(GRAPHS) or {}
    restored: list[str] = []
    skipped: dict[str, str] = {}
    drained = set(doc.get("drained", []))
    usable = [b.id for b in boxes if b.id not in drained]
    for name, raw in sorted(graphs.items()):
        record = GraphRecord.from_dict(raw)
        found = find_graph_copy(ray, record, boxes)
        if found is None:
            skipped[name] = str(
                ModelUnavailableError(
                    f"no box of the mesh holds a whole copy of graph '{name}' any more",
                    hint="run `edgemesh deploy` again from a box that has the package",
                )
            )
            log.error("%s", skipped[name])
            continue
        source = _source(ray, found[0], found[1])
        options = GraphDeployOptions(
            replicas=record.replicas_wanted,
            max_accuracy_loss=(
                DEFAULT_MAX_ACCURACY_LOSS
                if record.max_accuracy_loss is None
                else record.max_accuracy_loss
            ),
            threads=record.threads,
        )
        try:
            placed = place_replicas(
                ray,
                name,
                record.manifest.encode(),
                usable,
                source=source,
                origin_box=found[0],
                package_dir=found[1],
                options=options,
                at_most=True,
            )
        except EdgemeshError as exc:
            skipped[name] = str(exc)
            log.error("graph '%s' not restored: %s", name, exc)
            continue
        finally:
            ray.kill(source)
        graphs[name] = replace(
            record,
            replicas=tuple(placed.replicas),
            not_chosen=dict(placed.not_chosen),
            refused=dict(placed.refused),
            gateway=gateway_v1.removesuffix("/v1") + "/v2",
        ).to_dict()
        restored.append(name)
    if graphs:
        write_records(ray, doc, state_dir)
    return {"restored": restored, "skipped": skipped}


def status_rows(doc: dict[str, Any]) -> dict[str, Any]:
    """``graphs`` of ``edgemesh status --json``: where each graph model's replicas run."""
    graphs = {n: GraphRecord.from_dict(r) for n, r in (doc.get(GRAPHS) or {}).items()}
    return {
        name: {
            "gateway": r.gateway,
            "replicas": [
                {k: rep.get(k) for k in ("box", "backend", "precision", "device", "p50_ms")}
                for rep in r.replicas
            ],
            "refused": dict(r.refused),
        }
        for name, r in sorted(graphs.items())
    }


def render_status(rows: dict[str, Any]) -> list[str]:
    """Lines for ``edgemesh status`` (text) from ``status_rows``."""
    lines = []
    for name, row in rows.items():
        where = ", ".join(
            f"{r['box']} {r['backend']}/{r['precision']}"
            + (f" {r['p50_ms']:.2f} ms" if r.get("p50_ms") is not None else "")
            for r in row["replicas"]
        )
        lines.append(f"  graph {name}: {where or 'no replica'}  ({row['gateway']})")
    return lines


def status_here(state_dir: Path) -> dict[str, Any]:
    """``status_rows`` from this box's mirror of the records (no Ray needed)."""
    from edgemesh.mesh.deployments import DeploymentStore

    return status_rows(DeploymentStore(Path(state_dir) / "deployments.json").load())
