"""Where a graph model's replicas go: one actor per box, the best kept.

``place_replicas`` starts a ``GraphReplicaActor`` on every candidate box
(detached, named ``edgemesh-graph-<model>@<box>``, pinned by the box's
``box:<id>`` resource), waits for each to open the package with its own
engine and precision and time it, then keeps what
``graph.placement.choose_replicas`` picks and stops the rest. Used by
``edgemesh deploy`` (``graph_deploy``), the restore on a new head and the
dashboard's deploy (``gateway.mesh_manager``); it imports neither the
gateway nor the deploy, so any of them may import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edgemesh.errors import PlanError
from edgemesh.graph.placement import Candidate, choose_replicas
from edgemesh.graph.select import DEFAULT_MAX_ACCURACY_LOSS
from edgemesh.mesh.deployment_record import GraphRecord
from edgemesh.mesh.deployments import RAY_NAMESPACE as NAMESPACE
from edgemesh.router.graph_replica import GraphReplicaActor, actor_name

GRAPHS = "graphs"
"""The records' key for graph deployments (``doc["graphs"][name]``)."""


@dataclass(frozen=True)
class GraphDeployOptions:
    replicas: int | None = None
    """None: auto (every box close to the fastest); N: the N fastest."""
    max_accuracy_loss: float = DEFAULT_MAX_ACCURACY_LOSS
    threads: int | None = None
    load_timeout_s: float = 600.0


@dataclass(frozen=True)
class Placed:
    replicas: list[dict[str, Any]]
    not_chosen: dict[str, float | None]
    """box -> its measured p50 (ms): could serve it, but slower than the chosen."""
    refused: dict[str, str]
    """box -> why it cannot serve the model."""


def graph_record(
    name: str,
    manifest_bytes: bytes,
    *,
    package_dir: str,
    origin_box: str | None,
    placed: Placed,
    options: GraphDeployOptions,
    gateway: str | None,
) -> GraphRecord:
    """The record of a graph model just placed (``edgemesh deploy`` and the page)."""
    return GraphRecord(
        name=name,
        manifest=manifest_bytes.decode(),
        package_dir=package_dir,
        origin_box=origin_box,
        replicas=tuple(placed.replicas),
        not_chosen=dict(placed.not_chosen),
        refused=dict(placed.refused),
        replicas_wanted=options.replicas,
        max_accuracy_loss=options.max_accuracy_loss,
        threads=options.threads,
        gateway=gateway,
        deployed=time.time(),
    )


def place_replicas(
    ray: Any,
    name: str,
    manifest_bytes: bytes,
    boxes: list[str],
    *,
    source: Any,
    origin_box: str | None,
    package_dir: str,
    options: GraphDeployOptions,
    at_most: bool = False,
) -> Placed:
    """Start a replica on each of ``boxes``, keep the best; see the module docstring.
    ``at_most``: ``replicas=N`` with fewer able boxes keeps them all (a restore
    after boxes were lost serves on fewer rather than not at all)."""
    remove_replicas(ray, name, boxes)
    cls = ray.remote(GraphReplicaActor)
    actors = {
        box: cls.options(
            name=actor_name(name, box),
            namespace=NAMESPACE,
            lifetime="detached",
            resources={f"box:{box}": 0.001},
            num_cpus=0,
            max_restarts=0,
        ).remote(
            name,
            box,
            manifest_bytes,
            source,
            package_dir if box == origin_box else "",
            options.max_accuracy_loss,
            options.threads,
        )
        for box in boxes
    }
    refs = {box: a.load.remote() for box, a in actors.items()}
    infos: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for box, ref in refs.items():
        try:
            got = ray.get(ref, timeout=options.load_timeout_s)
        except Exception as exc:  # the actor or its node died, or it timed out
            lines = str(exc).strip().splitlines()
            got = {"refused": f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"}
        if "refused" in got:
            refused[box] = got["refused"]
        else:
            infos[box] = got
    try:
        if not infos:
            raise PlanError(
                f"no box of the mesh can serve '{name}': "
                + "; ".join(f"{b}: {why}" for b, why in sorted(refused.items())),
            )
        wanted = options.replicas
        if wanted is not None and at_most:
            wanted = min(wanted, len(infos))
        chosen = choose_replicas(
            [Candidate(b, infos[b].get("measured_p50_ms")) for b in sorted(infos)], wanted
        )
    except PlanError:
        for a in actors.values():
            ray.kill(a)
        raise
    keep = {c.box for c in chosen}
    for box, a in actors.items():
        if box not in keep:
            ray.kill(a)
    replicas = [
        {
            "box": c.box,
            "actor": actor_name(name, c.box),
            "backend": infos[c.box]["backend"],
            "precision": infos[c.box]["precision"],
            "device": infos[c.box]["device"],
            "p50_ms": infos[c.box].get("measured_p50_ms"),
            "chosen_by": infos[c.box].get("chosen_by"),
            "fetched": infos[c.box].get("fetched"),
        }
        for c in chosen
    ]
    not_chosen = {b: infos[b].get("measured_p50_ms") for b in sorted(infos) if b not in keep}
    return Placed(replicas, not_chosen, refused)


def remove_replicas(ray: Any, name: str, boxes: list[str]) -> None:
    """Stop model ``name``'s replica actors on ``boxes`` (those running)."""
    for box in boxes:
        try:
            ray.kill(ray.get_actor(actor_name(name, box), namespace=NAMESPACE))
        except ValueError:
            pass  # none there
