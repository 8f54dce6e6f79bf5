"""A deployed package's files, served from the head: the mirror actor.

The package stays on the box it was deployed from; its files are copied
(sha256-verified) into the head's cache by a detached, named actor that
every stage fetches its pieces from, so the model survives the source box.
"""

from __future__ import annotations

from typing import Any

from edgemesh.mesh.deployment_record import PackageRef
from edgemesh.mesh.deployments import RAY_NAMESPACE as NAMESPACE

SOURCE_PREFIX = "edgemesh-artifacts-"
"""Name prefix of the mirror actors (``<prefix><model>``)."""


def mirror_package(
    ray: Any, name: str, package: PackageRef, *, source_box: str, path: str, head: str
) -> Any:
    """Copy ``package`` from ``path`` on ``source_box`` (its origin, or any box
    holding a whole copy) into the head's cache (sha256-verified) and serve it
    from there; returns the mirror actor (a Ray actor handle)."""
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
        .remote(package, origin, head)
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
