"""The boxes of a running mesh and their planner profiles, measured on each box.

Used by the deploy, the membership watcher (a box that joins is measured
before the re-plan) and the gateway's mesh manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemesh.mesh.deployment_record import JSONObject

if TYPE_CHECKING:
    from edgemesh.sharding.planner.boxes import BoxProfile


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


def box_profile(box_id: str, is_head: bool) -> JSONObject:
    """The box's planner profile with the memory its stages can really use
    (``fingerprint.usable_profile``), less the head's Ray Serve share. Runs on
    the box; the driver parses it (``measure_profiles``)."""
    from edgemesh.fingerprint import usable_profile

    raw = usable_profile(box_id, reserve_bytes=SERVE_RESERVE_BYTES if is_head else 0)
    return {**raw, "id": box_id}


def measure_profiles(ray: Any, boxes: list[MeshBox], timeout_s: float = 600.0) -> list[BoxProfile]:
    """Each box measures itself (on its own CPU) in a task pinned to it."""
    from edgemesh.sharding.planner.boxes import BoxProfile

    task = ray.remote(box_profile)
    refs = [
        task.options(resources={f"box:{b.id}": 0.001}, num_cpus=0).remote(b.id, b.is_head)
        for b in boxes
    ]
    return [BoxProfile.from_dict(p) for p in ray.get(refs, timeout=timeout_s)]
