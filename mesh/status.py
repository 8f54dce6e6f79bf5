"""``edgemesh status``: every box of the mesh, from any box.

When this box's agent is running, its ``state.json`` already holds the
verified mDNS records of every box plus Ray's node table (the agent
watches the head), so status reads that. Without a running agent, status
browses mDNS itself for a few seconds and verifies every record with the
mesh secret; health is then "unknown", since only records are seen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import psutil

from edgemesh import __version__
from edgemesh.errors import AuthError, BoxLostError
from edgemesh.mesh.config import (
    JoinSettings,
    MeshSecret,
    StatePaths,
    default_state_dir,
    read_json,
    state_folder,
)

STALE_AFTER_S = 10.0

AgentState: TypeAlias = dict[str, Any]
"""An agent's ``state.json`` (``Agent.state``): free-form JSON written by the
agent of the same box and version, read here field by field."""
MemberJSON: TypeAlias = dict[str, Any]
"""One entry of ``AgentState["members"]`` (a verified mDNS record plus health),
or ``BoxRecord.to_dict()`` when status browsed mDNS itself."""
StatusJSON: TypeAlias = dict[str, Any]
"""What ``edgemesh status --json`` prints (``MeshStatus.to_dict``)."""
FingerprintSummary: TypeAlias = dict[str, Any]
"""A box's fingerprint summary as its record carries it (arch, cores, memory,
accelerators, backends, precision, digest)."""
NodeJSON: TypeAlias = dict[str, Any]
"""One row of the head's Ray node table as the agent keeps it (box, node_id,
alive, resources)."""


def read_agent_state(state_dir: Path | None = None) -> AgentState | None:
    """The running agent's ``state.json`` for ``state_dir`` (default: the
    default mesh's), or None when no agent is running there."""
    folder = state_dir or default_state_dir("default")
    doc = read_json(StatePaths(folder).state)
    if not isinstance(doc, dict) or not doc.get("running"):
        return None
    if time.time() - float(doc.get("updated", 0)) > STALE_AFTER_S:
        return None
    if not psutil.pid_exists(int(doc.get("pid", 0))):
        return None
    return doc


def health(member: MemberJSON) -> str:
    """ok, starting, joining, electing or ray-down (from one member entry)."""
    role = member.get("role")
    if role == "head":
        return "ok" if member.get("ready") else "starting"
    if role == "worker":
        alive = member.get("ray_alive")
        if alive is None:
            return "ok" if member.get("ready") else "joining"
        return "ok" if alive else "ray-down"
    return "electing"


@dataclass
class BoxStatus:
    """One box of the mesh as ``status`` reports it.

    ``ray_node_id`` and ``resources`` come from the head's node table (the
    box's alive node, found by its ``box:<id>`` resource); they are None and
    ``{}`` until that node is up, and always when status came from mDNS.
    """

    id: str
    role: str
    address: str
    health: str
    fingerprint: FingerprintSummary = field(default_factory=dict)
    ray_address: str = ""
    ray_node_id: str | None = None
    resources: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    version: str | None = None
    is_self: bool = False

    def to_dict(self) -> StatusJSON:
        return {
            "id": self.id,
            "role": self.role,
            "address": self.address,
            "health": self.health,
            "fingerprint": self.fingerprint,
            "ray_address": self.ray_address,
            "ray_node_id": self.ray_node_id,
            "resources": self.resources,
            "started": self.started,
            "version": self.version,
            "self": self.is_self,
        }


def _box(
    member: MemberJSON,
    *,
    me: str | None,
    with_health: bool,
    nodes: Sequence[NodeJSON] = (),
) -> BoxStatus:
    node = next((n for n in nodes if n.get("alive") and n.get("box") == member["id"]), None)
    return BoxStatus(
        id=member["id"],
        role=member["role"],
        address=member["address"],
        health=health(member) if with_health else "unknown",
        fingerprint=member.get("fingerprint", {}),
        ray_address=member.get("ray_address", ""),
        ray_node_id=node["node_id"] if node else None,
        resources=dict(node.get("resources", {})) if node else {},
        started=member.get("started"),
        version=member.get("version"),
        is_self=member["id"] == me,
    )


@dataclass
class MeshStatus:
    """What ``edgemesh status --json`` prints (``to_dict``)."""

    mesh: str
    source: str
    box_id: str | None = None
    role: str | None = None
    head: str | None = None
    ray_address: str = ""
    boxes: list[BoxStatus] = field(default_factory=list)
    ray_nodes: list[NodeJSON] = field(default_factory=list)
    lost: list[MemberJSON] = field(default_factory=list)
    """Boxes the agent saw leave: ``{"id", "reason", ...}``."""
    rejected: list[MemberJSON] = field(default_factory=list)
    """Records that were ignored: ``RecordRejected`` as ``{"name", "address", "reason"}``."""

    def box(self, box_id: str) -> BoxStatus | None:
        return next((b for b in self.boxes if b.id == box_id), None)

    def to_dict(self) -> StatusJSON:
        return {
            "mesh": self.mesh,
            "source": self.source,
            "box": self.box_id,
            "role": self.role,
            "head": self.head,
            "ray_address": self.ray_address,
            "boxes": [b.to_dict() for b in self.boxes],
            "ray_nodes": self.ray_nodes,
            "lost": self.lost,
            "rejected": self.rejected,
        }


def from_agent(doc: AgentState) -> MeshStatus:
    """A status from an agent's ``state.json`` document."""
    me = doc.get("box_id")
    ray = doc.get("ray", {})
    nodes = ray.get("nodes", [])
    return MeshStatus(
        mesh=doc["mesh"],
        source="agent",
        box_id=me,
        role=doc.get("role"),
        head=doc.get("head"),
        ray_address=ray.get("address", ""),
        boxes=[_box(m, me=me, with_health=True, nodes=nodes) for m in doc.get("members", [])],
        ray_nodes=nodes,
        lost=doc.get("lost", []),
        rejected=doc.get("rejected", []),
    )


def read_status(state_dir: Path | None = None, *, mesh: str | None = None) -> MeshStatus:
    """The mesh as this box's running agent sees it (cheap: one file read).

    ``state_dir`` defaults to the default folder of ``mesh`` ("default").
    Raises ``BoxLostError`` when no agent is running there.
    """
    folder = state_folder(state_dir, mesh)
    doc = read_agent_state(folder)
    if doc is None:
        raise BoxLostError(
            f"no edgemesh agent is running for {folder}", hint="run `edgemesh join` on this box"
        )
    return from_agent(doc)


def collect_status(
    settings: JoinSettings, secret: MeshSecret | None, *, browse_s: float = 3.0
) -> MeshStatus:
    """Status from the running agent, else from an mDNS browse (needs the secret)."""
    doc = read_agent_state(settings.state_dir)
    if doc is not None and doc.get("mesh") == settings.mesh:
        return from_agent(doc)
    if secret is None:
        raise AuthError(
            "no agent runs on this box and no mesh secret was found",
            hint="pass --secret-file, or run `edgemesh join` first",
        )
    from edgemesh.mesh.discovery import browse_once
    from edgemesh.mesh.network import choose_interface
    from edgemesh.mesh.ray_node import ray_version

    iface = choose_interface(settings.interface)
    records, rejected = browse_once(
        mesh=settings.mesh,
        key=secret.mdns_key(settings.mesh),
        address=iface.address,
        version=__version__,
        ray_version=ray_version(),
        seconds=browse_s,
    )
    heads = sorted((r for r in records if r.role == "head"), key=lambda r: r.key)
    return MeshStatus(
        mesh=settings.mesh,
        source="mdns",
        head=heads[0].box_id if heads else None,
        ray_address=heads[0].ray_address if heads else "",
        boxes=[_box(r.to_dict(), me=None, with_health=False) for r in records],
        rejected=[r.to_dict() for r in rejected],
    )


def _gib(n: float | None) -> str:
    return "-" if not n else f"{n / 1024**3:.1f}G"


def render(status: MeshStatus) -> str:
    """A table for people; ``--json`` has everything."""
    lines = [
        f"mesh {status.mesh}: {len(status.boxes)} box(es), head {status.head or '-'}"
        + (f", Ray at {status.ray_address}" if status.ray_address else "")
        + ("" if status.source == "agent" else "  (from mDNS; no agent on this box)"),
        f"{'':1} {'box':<24} {'role':<9} {'address':<16} {'health':<9} "
        f"{'arch':<8} {'cores':>5} {'memory':>7}  {'accel':<12} digest",
    ]
    for b in status.boxes:
        fp = b.fingerprint
        accel = ",".join(fp.get("accelerators") or []) or "-"
        cores = fp.get("cores_effective")
        lines.append(
            f"{'*' if b.is_self else ' '} {b.id:<24} {b.role:<9} {b.address:<16} "
            f"{b.health:<9} {fp.get('arch') or '-':<8} "
            f"{cores if cores is not None else '-':>5} {_gib(fp.get('memory_limit_bytes')):>7}  "
            f"{accel:<12} {fp.get('digest', '')}"
        )
    for lost in status.lost:
        lines.append(f"  lost: {lost['id']} ({lost['reason']})")
    for rej in status.rejected:
        lines.append(f"  ignored: {rej['name']} from {rej['address'] or '?'} ({rej['reason']})")
    return "\n".join(lines)
