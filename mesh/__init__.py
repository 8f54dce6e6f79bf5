"""Mesh: boxes that find each other (mDNS), elect a head and form a Ray cluster.

The public surface for other code on a box (see docs/MESH.md)::

    connect(mesh=...)         ray.init against the mesh's cluster -> RayConnection
    ray_connection(mesh=...)  the same without ray.init (address, token env)
    read_status(mesh=...)     MeshStatus: boxes, roles, Ray node ids, health
    follow(mesh=...)          MemberEvent iterator (join, leave, crash, head)

Nothing here imports Ray or zeroconf; only ``connect`` does, when called.
"""

from edgemesh.mesh.connect import RayConnection, connect, ray_connection
from edgemesh.mesh.membership import MemberEvent, Membership, follow
from edgemesh.mesh.status import BoxStatus, MeshStatus, read_status

__all__ = [
    "BoxStatus",
    "MemberEvent",
    "Membership",
    "MeshStatus",
    "RayConnection",
    "connect",
    "follow",
    "ray_connection",
    "read_status",
]
