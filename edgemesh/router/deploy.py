"""``edgemesh deploy``: plan a package over the mesh's boxes, place it, serve it.

Steps, from any box of the mesh (a Ray driver connected with the mesh's token):

1. Box profiles: each box with a live Ray node measures itself in a task
   pinned to it (``edgemesh info --measure``'s figures, cached per box), unless
   profiles are given (``--boxes``).
2. Plan with ``edgemesh.sharding.planner.plan.plan``.
3. Artifacts: a source actor on this box serves the package; a detached
   mirror on the head copies it (sha256-verified) so the package outlives
   this box; stages fetch from the mirror what their box lacks.
4. The record (plan, profiles, manifest, gateway URL) goes into the head's
   GCS KV and this box's ``deployments.json`` (``edgemesh.mesh.deployments``),
   so it survives a head change.
5. The Ray Serve gateway on the head is (re)started with every record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgemesh.errors import ConfigError, CorruptArtifactError, MeshError, require
from edgemesh.mesh import deployments
from edgemesh.mesh.deployment_record import DeploymentRecord, JSONObject, PackageRef
from edgemesh.mesh.deployments import RAY_NAMESPACE
from edgemesh.router.mirror import SOURCE_PREFIX, mirror_package
from edgemesh.router.placement import checked_plan
from edgemesh.router.profiles import measure_profiles, mesh_boxes

if TYPE_CHECKING:
    from edgemesh.limits import ServingLimits
    from edgemesh.router.artifacts import Source
    from edgemesh.sharding.planner.boxes import BoxProfile, Link
    from edgemesh.sharding.planner.costs import PlanOptions

log = logging.getLogger(__name__)

NAMESPACE = RAY_NAMESPACE


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


def gateway_keys(digests: Sequence[str]) -> list[str]:
    """The gateway's key list (``sha256:<hex>`` entries) from the records' digests."""
    return [f"sha256:{d}" for d in digests]


def deploy(
    package_dir: Path,
    *,
    name: str | None = None,
    here: str,
    profiles: Sequence[BoxProfile] | Sequence[JSONObject] | None = None,
    links: Sequence[Link] | Sequence[JSONObject] | None = None,
    port: int = 8000,
    host: str | None = None,
    api_keys: list[str] | tuple[str, ...] = (),
    state_dir: Path | None = None,
    plan_options: PlanOptions | None = None,
    fixed_plan: JSONObject | None = None,
    limits: ServingLimits | None = None,
) -> DeploymentRecord:
    """Plan, place and serve ``package_dir``; returns the record (with ``gateway``).

    ``here`` is this box's id (the artifact source). Ray must be initialised
    against the mesh (``edgemesh.mesh.connect``). ``profiles``/``links`` given
    as JSON (``--boxes``) are parsed here. ``host``: see ``gateway_bind``
    (kept in the records, so a restore binds the same way); ``api_keys`` are
    kept as sha256 digests. ``fixed_plan`` (a plan as
    ``edgemesh plan --json`` prints it) replaces the planner's choice for the
    first placement; after a loss the mesh still re-plans from ``profiles``.
    ``limits``: the serving limits kept in the record (None: the defaults).
    """
    ray = require("ray", "mesh")
    from edgemesh.router.serve import start_gateway
    from edgemesh.sharding.planner.boxes import as_boxes, as_links
    from edgemesh.sharding.planner.plan import plan

    if not ray.is_initialized():
        raise MeshError("not connected to the mesh's Ray", hint="run `edgemesh join` first")
    package = PackageRef.from_folder(package_dir, origin_box=here)
    if "graphs" not in package.manifest.extra:
        raise CorruptArtifactError(
            f"{package.path}/manifest.json", "not an ONNX layer-range package (no 'graphs' entry)"
        )
    name = name or package.name
    boxes = mesh_boxes(ray)
    head = next((b for b in boxes if b.is_head), None)
    if head is None:
        raise MeshError("the mesh's Ray cluster has no live head box with a box:<id> resource")
    box_profiles = measure_profiles(ray, boxes) if profiles is None else as_boxes(profiles)
    box_links = as_links(links)
    known = {b.id for b in boxes}
    unknown = sorted({p.id for p in box_profiles} - known)
    if unknown:
        raise ConfigError(f"profiles for boxes not in the mesh: {', '.join(unknown)}")
    if fixed_plan is not None:
        placed = checked_plan(fixed_plan, package.manifest, known)
    else:
        placed = plan(package.manifest, box_profiles, box_links, plan_options)

    # The package stays reachable from the head even if this box leaves.
    mirror_package(ray, name, package, source_box=here, path=package.path, head=head.id)

    doc = deployments.load(ray)
    if api_keys:
        doc.api_key_sha256 = key_digests(api_keys)
    if host is not None or doc.gateway_host is None:
        doc.gateway_host = host or (MESH_HOST if doc.api_key_sha256 else LOOPBACK)
    bind, shown = gateway_bind(doc.gateway_host, head.address, keyed=True)
    url = f"http://{shown}:{port}/v1"
    record = DeploymentRecord.new(
        name,
        package,
        placed,
        box_profiles,
        box_links,
        gateway=url,
        deployed=time.time(),
        limits=limits,
    )
    doc.models[name] = record
    sources: dict[str, Source] = {
        n: ray.get_actor(f"{SOURCE_PREFIX}{n}", namespace=NAMESPACE) for n in doc.models
    }
    start_gateway(
        list(doc.models.values()),
        head.id,
        sources,
        host=bind,
        port=port,
        api_keys=gateway_keys(doc.api_key_sha256),
    )
    doc.gateway = url
    deployments.save(ray, doc, state_dir)
    return record


def status_extras(state_dir: Path) -> JSONObject:
    """``gateway`` and per-model ``stages`` for ``edgemesh status --json``, from
    this box's mirror of the deployment records (no Ray needed)."""
    from edgemesh.mesh.deployments import DeploymentStore

    doc = DeploymentStore(Path(state_dir) / "deployments.json").deployments()
    return {
        "gateway": doc.gateway_url(),
        "models": {
            name: {"stages": [s.to_dict() for s in m.stages], "gateway": m.gateway}
            for name, m in sorted(doc.models.items())
        },
    }
