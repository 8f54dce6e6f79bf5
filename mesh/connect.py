"""How other processes on a box reach the mesh's Ray cluster.

The agent (``edgemesh join``) writes the head's GCS address, this box's mesh
address and the path of its 0600 token file into ``state.json``;
``ray_connection`` turns that into a ``RayConnection`` and ``connect`` also
runs ``ray.init`` with it. Ray is imported only by ``RayConnection.init``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemesh.errors import BoxLostError, ConfigError, MissingExtraError
from edgemesh.mesh.config import state_folder
from edgemesh.mesh.ray_node import auth_env
from edgemesh.mesh.status import read_agent_state


@dataclass(frozen=True)
class RayConnection:
    """What a driver needs to talk to the mesh's Ray cluster (no secret inside:
    the token stays in its file, and ``repr`` shows only the path)."""

    mesh: str
    box_id: str
    head_box: str | None
    address: str
    node_ip: str
    token_file: Path

    def env(self) -> dict[str, str]:
        """Variables a subprocess needs to talk to the cluster (token auth on)."""
        return auth_env(self.token_file)

    def init(self, **init_kwargs: Any) -> Any:
        """``ray.init`` against the mesh from this process; returns Ray's context.

        Sets the auth variables in ``os.environ`` first, because Ray reads
        them once, when it first needs a token. Raises ``BoxLostError`` when
        the head does not answer.
        """
        already = "ray" in sys.modules
        os.environ.update(self.env())
        try:
            import ray
            from ray._raylet import Config  # type: ignore[attr-defined]  # not in ray's .pyi
        except ImportError as exc:
            raise MissingExtraError("ray", "mesh") from exc
        if already:
            # Ray read RAY_AUTH_MODE when it was imported; re-reading its config
            # is what Ray itself does when it turns token auth on in-process.
            Config.initialize("")
        init_kwargs.setdefault("_node_ip_address", self.node_ip)
        init_kwargs.setdefault("logging_level", "warning")
        init_kwargs.setdefault("log_to_driver", False)
        try:
            return ray.init(address=self.address, **init_kwargs)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, its own types
            raise BoxLostError(
                f"cannot connect to the mesh's Ray head at {self.address}: {exc}",
                hint="check `edgemesh status` on this box",
            ) from exc


def ray_connection(state_dir: Path | None = None, *, mesh: str | None = None) -> RayConnection:
    """The mesh's Ray address and auth for this box, from its running agent.

    Raises ``BoxLostError`` when no agent runs for that folder or its box is
    not in a Ray cluster yet (still electing, or its head just left).
    """
    folder = state_folder(state_dir, mesh)
    doc = read_agent_state(folder)
    if doc is None:
        raise BoxLostError(
            f"no edgemesh agent is running for {folder}", hint="run `edgemesh join` on this box"
        )
    if mesh is not None and doc.get("mesh") != mesh:
        raise ConfigError(f"the agent in {folder} serves mesh '{doc.get('mesh')}', not '{mesh}'")
    ray_info = doc.get("ray") or {}
    if not ray_info.get("address"):
        raise BoxLostError(
            f"box {doc.get('box_id')} is not in a Ray cluster yet "
            f"({doc.get('decision', {}).get('reason', 'electing a head')})",
            hint="wait a few seconds and retry",
        )
    return RayConnection(
        mesh=doc["mesh"],
        box_id=doc["box_id"],
        head_box=doc.get("head"),
        address=ray_info["address"],
        node_ip=ray_info.get("node_ip") or doc.get("address", ""),
        token_file=Path(ray_info["token_file"]),
    )


def connect(
    state_dir: Path | None = None, *, mesh: str | None = None, **init_kwargs: Any
) -> RayConnection:
    """``ray_connection(...)`` and ``ray.init`` with it; returns the connection."""
    conn = ray_connection(state_dir, mesh=mesh)
    conn.init(**init_kwargs)
    return conn
