"""``edgemesh deploy``: plan a package over the mesh's boxes, place it, serve it.

Steps, from any box of the mesh (a Ray driver connected with the mesh's token):

1. Box profiles: each box with a live Ray node measures itself in a task
   pinned to it (``edgemesh info --measure``'s figures, cached per box), unless
   profiles are given (``--boxes``).
2. Plan with ``edgemesh.sharding.planner.plan``.
3. Artifacts: a source actor on this box serves the package; a detached
   mirror on the head copies it (sha256-verified) so the package outlives
   this box; stages fetch from the mirror what their box lacks.
4. The record (plan, profiles, manifest, gateway URL) goes into the head's
   GCS KV and this box's ``deployments.json`` (``edgemesh.mesh.deployments``),
   so it survives a head change.
5. The Ray Serve gateway on the head is (re)started with every record.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError, MeshError, require

log = logging.getLogger(__name__)

SOURCE_PREFIX = "edgemesh-artifacts-"
NAMESPACE = "edgemesh"


@dataclass(frozen=True)
class MeshBox:
    id: str
    node_id: str
    address: str
    is_head: bool


def mesh_boxes(ray: Any) -> list[MeshBox]:
    """Boxes with a live Ray node, from the node table's ``box:<id>`` resources."""
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for key in node.get("Resources", {}):
            if key.startswith("box:"):
                head = any(k.startswith("node:__internal_head__") for k in node["Resources"])
                out.append(MeshBox(key[4:], node["NodeID"], node["NodeManagerAddress"], head))
    return sorted(out, key=lambda b: b.id)


# The head also runs Ray Serve (controller, proxy, the gateway replica with its
# engine), which starts after the boxes are profiled: about 0.7 GB more than a
# worker's agent + Ray node in the memory benchmark (bench/memory.py).
SERVE_RESERVE_BYTES = 800 * 1024 * 1024


def _profile(box_id: str, is_head: bool) -> dict[str, Any]:
    """The box's planner profile, with the memory its stages can really use.

    ``memory_limit_bytes`` becomes what is *available* now: the box's agent,
    Ray node and this task already live inside its limit (a cgroup's usage is
    counted against it), so planning against the bare limit over-commits and
    stages get OOM-killed on small boxes.
    """
    from edgemesh.fingerprint import collect

    fp = collect(measure=True, box_id=box_id)
    profile = fp.profile()
    usable = min(fp.memory.limit_bytes, fp.memory.available_bytes)
    if is_head:
        usable -= SERVE_RESERVE_BYTES
    profile["memory_limit_bytes"] = max(0, usable)
    return profile


def measure_profiles(ray: Any, boxes: list[MeshBox], timeout_s: float = 600.0) -> list[dict]:
    """Each box measures itself (on its own CPU) in a task pinned to it."""
    task = ray.remote(_profile)
    refs = [
        task.options(resources={f"box:{b.id}": 0.001}, num_cpus=0).remote(b.id, b.is_head)
        for b in boxes
    ]
    profiles = ray.get(refs, timeout=timeout_s)
    for b, p in zip(boxes, profiles, strict=True):
        p["id"] = b.id
    return profiles


def read_records(ray: Any) -> dict[str, Any]:
    from edgemesh.mesh.deployments import KV_KEY

    raw = ray.experimental.internal_kv._internal_kv_get(KV_KEY, namespace=NAMESPACE)
    if not raw:
        return {"version": 0, "updated": 0.0, "models": {}}
    return json.loads(raw)


def write_records(ray: Any, doc: dict[str, Any], state_dir: Path | None) -> None:
    from edgemesh.mesh.deployments import KV_KEY, DeploymentStore

    doc["version"] = int(doc.get("version", 0)) + 1
    doc["updated"] = time.time()
    ray.experimental.internal_kv._internal_kv_put(
        KV_KEY, json.dumps(doc).encode(), overwrite=True, namespace=NAMESPACE
    )
    if state_dir is not None:
        DeploymentStore(Path(state_dir) / "deployments.json").replace(doc)


LOOPBACK = "127.0.0.1"
MESH_HOST = "mesh"
"""``--host mesh``: the head's mesh address (reachable from the other boxes)."""


def gateway_bind(host: str | None, head_address: str, *, keyed: bool) -> tuple[str, str]:
    """(address the gateway listens on, address in its URL) for ``--host``.

    ``None`` is the safe default: the head's loopback only, unless the
    gateway has an API key, when it is the mesh address. ``mesh`` is the
    head's mesh address; ``0.0.0.0`` every interface (the URL names the
    mesh address)."""
    if host is None:
        host = MESH_HOST if keyed else LOOPBACK
    if host == MESH_HOST:
        return head_address, head_address
    if host in ("0.0.0.0", "::"):
        return host, head_address
    return host, host


def key_digests(api_keys: list[str] | tuple[str, ...]) -> list[str]:
    """What the records keep of the gateway's API keys: sha256 digests, never the keys."""
    import hashlib

    return [hashlib.sha256(k.encode()).hexdigest() for k in api_keys]


def gateway_keys(doc: dict[str, Any]) -> list[str]:
    """The gateway's key list (``sha256:<hex>`` entries) from the records."""
    return [f"sha256:{d}" for d in doc.get("api_key_sha256", [])]


def deploy(
    package_dir: Path,
    *,
    name: str | None = None,
    here: str,
    profiles: list[dict[str, Any]] | None = None,
    links: list[dict[str, Any]] | None = None,
    port: int = 8000,
    host: str | None = None,
    api_keys: list[str] | tuple[str, ...] = (),
    state_dir: Path | None = None,
    plan_options: Any = None,
    fixed_plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan, place and serve ``package_dir``; returns the record (with ``gateway``).

    ``here`` is this box's id (the artifact source). Ray must be initialised
    against the mesh (``edgemesh.mesh.connect``). ``host``: see ``gateway_bind``
    (kept in the records, so a restore binds the same way); ``api_keys`` are
    kept as sha256 digests. ``fixed_plan`` (a plan as
    ``edgemesh plan --json`` prints it) replaces the planner's choice for the
    first placement; after a loss the mesh still re-plans from ``profiles``.
    """
    ray = require("ray", "mesh")
    from edgemesh.router.serve import start_gateway
    from edgemesh.sharding.package import open_package
    from edgemesh.sharding.planner import plan

    if not ray.is_initialized():
        raise MeshError("not connected to the mesh's Ray", hint="run `edgemesh join` first")
    package = open_package(package_dir)
    name = name or package.manifest.name
    boxes = mesh_boxes(ray)
    head = next((b for b in boxes if b.is_head), None)
    if head is None:
        raise MeshError("the mesh's Ray cluster has no live head box with a box:<id> resource")
    if profiles is None:
        profiles = measure_profiles(ray, boxes)
    known = {b.id for b in boxes}
    unknown = sorted({p["id"] for p in profiles} - known)
    if unknown:
        raise ConfigError(f"profiles for boxes not in the mesh: {', '.join(unknown)}")
    if fixed_plan is not None:
        placed = _checked_plan(fixed_plan, package.manifest, known)
    else:
        placed = plan(package.manifest, profiles, links, plan_options)
    manifest_bytes = (package.root / "manifest.json").read_bytes()

    # The package stays reachable from the head even if this box leaves.
    mirror_package(ray, name, manifest_bytes, source_box=here, path=str(package.root), head=head.id)

    doc = read_records(ray)
    if api_keys:
        doc["api_key_sha256"] = key_digests(api_keys)
    if host is not None or "gateway_host" not in doc:
        doc["gateway_host"] = host or (MESH_HOST if doc.get("api_key_sha256") else LOOPBACK)
    bind, shown = gateway_bind(doc["gateway_host"], head.address, keyed=True)
    url = f"http://{shown}:{port}/v1"
    doc["models"][name] = {
        "name": name,
        "manifest": manifest_bytes.decode(),
        "package_dir": str(package.root),
        "origin_box": here,
        "plan": placed.to_dict(),
        "profiles": profiles,
        "links": links or [],
        "stages": [
            {
                "box": s.box,
                "layers": [s.layers.start, s.layers.stop],
                "backend": s.backend,
                "precision": s.precision,
            }
            for s in placed.stages
        ],
        "gateway": url,
        "deployed": time.time(),
    }
    sources = {n: ray.get_actor(f"{SOURCE_PREFIX}{n}", namespace=NAMESPACE) for n in doc["models"]}
    start_gateway(
        list(doc["models"].values()),
        head.id,
        sources,
        host=bind,
        port=port,
        api_keys=gateway_keys(doc),
    )
    doc["gateway"] = url
    write_records(ray, doc, state_dir)
    return doc["models"][name]


def _checked_plan(doc: dict[str, Any], manifest: Any, boxes: set[str]) -> Any:
    """A given plan, refused when it is for another model or names absent boxes."""
    from edgemesh.sharding.planner import Plan

    placed = Plan.from_dict(doc)
    if placed.model != manifest.name or placed.num_layers != manifest.num_layers:
        raise ConfigError(
            f"the plan is for '{placed.model}' ({placed.num_layers} layers), not "
            f"'{manifest.name}' ({manifest.num_layers} layers)"
        )
    absent = sorted({st.box for st in placed.stages} - boxes)
    if absent:
        raise ConfigError(
            f"the plan places layers on boxes not in the mesh: {', '.join(absent)}",
            hint="run `edgemesh status` to list the boxes, or drop --plan",
        )
    return placed


def mirror_package(
    ray: Any, name: str, manifest_bytes: bytes, *, source_box: str, path: str, head: str
) -> Any:
    """Copy the package at ``path`` on ``source_box`` into the head's cache
    (sha256-verified) and serve it from there; returns the mirror actor."""
    from edgemesh.router.artifacts import ArtifactSource, MirrorSource

    opts = {"namespace": NAMESPACE, "lifetime": "detached", "num_cpus": 0}
    _kill_named(ray, f"{SOURCE_PREFIX}{name}-origin")
    origin = (
        ray.remote(ArtifactSource)
        .options(
            name=f"{SOURCE_PREFIX}{name}-origin", resources={f"box:{source_box}": 0.001}, **opts
        )
        .remote(path)
    )
    mirror_name = f"{SOURCE_PREFIX}{name}"
    _kill_named(ray, mirror_name)
    mirror = (
        ray.remote(MirrorSource)
        .options(name=mirror_name, resources={f"box:{head}": 0.001}, **opts)
        .remote(manifest_bytes, origin, head)
    )
    try:
        ray.get(mirror.manifest.remote(), timeout=600)
    finally:
        ray.kill(origin)
    return mirror


def _kill_named(ray: Any, name: str) -> None:
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass  # not running


def status_extras(state_dir: Path) -> dict[str, Any]:
    """``gateway`` and per-model ``stages`` for ``edgemesh status --json``, from
    this box's mirror of the deployment records (no Ray needed)."""
    from edgemesh.mesh.deployments import DeploymentStore

    doc = DeploymentStore(Path(state_dir) / "deployments.json").load()
    models = doc.get("models", {})
    gateway = doc.get("gateway") or next(
        (m.get("gateway") for m in models.values() if m.get("gateway")), None
    )
    return {
        "gateway": gateway,
        "models": {
            name: {"stages": m.get("stages", []), "gateway": m.get("gateway")}
            for name, m in sorted(models.items())
        },
    }
