"""The mesh gateway: the single box's OpenAI app, served by Ray Serve on the head.

The deployment is one replica pinned to the head box. Its constructor opens
every deployed model (``mesh_service``: a ``RayPipeline`` per model, or the
in-process path for a one-stage plan on the head), and
``__serve_build_asgi_app__`` hands Ray Serve the very app ``edgemesh serve``
uses (``edgemesh.gateway.create_app``), so both speak the same API, errors,
429s and streaming included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgemesh.errors import MeshError, require
from edgemesh.mesh.deployment_record import DeploymentRecord, StageInfo

if TYPE_CHECKING:
    from edgemesh.router.artifacts import Source
    from edgemesh.sharding.planner.plan import Plan

log = logging.getLogger(__name__)

APP_NAME = "edgemesh"
DEPLOYMENT = "edgemesh-gateway"


class MeshGateway:
    """The Serve replica (decorated in ``gateway_app``)."""

    def __init__(
        self,
        records: list[DeploymentRecord],
        head_box: str,
        sources: dict[str, Source],
        api_keys: Sequence[str] = (),
    ) -> None:
        import ray

        from edgemesh.router.membership import MembershipWatcher, measure_box
        from edgemesh.router.service import mesh_service

        logging.basicConfig(level=logging.INFO)
        self.api_keys = tuple(api_keys)
        self.head_box = head_box
        self.sources = dict(sources)
        self.manager: Any = None  # the dashboard's MeshManager, once the app is built
        self.services = [
            mesh_service(r, here=head_box, source=sources.get(r.name), on_change=self._changed)
            for r in records
        ]
        self.watcher = MembershipWatcher(
            ray,
            [s.engine.pipeline for s in self.services],
            measure=lambda box: measure_box(ray, box),
        )
        self.watcher.start()
        from edgemesh.mesh.deployments import read_records
        from edgemesh.router.graph_replica import open_graph_sets

        # Graph models (/v2): replica actors placed by `edgemesh deploy` (graph_deploy).
        self.graphs = open_graph_sets(ray, read_records(ray).get("graphs") or {})

    def __serve_build_asgi_app__(self) -> Any:
        from edgemesh.gateway import create_app
        from edgemesh.gateway.mesh_manager import MeshManager

        # Every box of the mesh on the dashboard, and deploys from the page.
        self.manager = MeshManager(self.head_box, self.watcher, self.sources)
        return create_app(
            self.services, api_keys=self.api_keys, manager=self.manager, graphs=self.graphs
        )

    def _changed(self, name: str, stages: list[StageInfo], plan: Plan) -> None:
        if self.manager is not None:  # records it and logs the event
            self.manager._on_change(name, stages, plan)
        else:
            import ray

            from edgemesh.mesh.deployments import record_stages

            record_stages(ray, name, stages, plan)

    def __del__(self) -> None:
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        for service in getattr(self, "services", []):
            try:
                service.close()
            except Exception as exc:  # shutting down: nothing left to report to
                log.debug("closing %s: %r", service.name, exc)


def gateway_app(
    records: list[DeploymentRecord],
    head_box: str,
    sources: dict[str, Source],
    api_keys: Sequence[str] = (),
) -> Any:
    """The bound Serve application (``serve.run`` it)."""
    serve = require("ray.serve", "mesh")
    cls = serve.deployment(
        name=DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0, "resources": {f"box:{head_box}": 0.001}},
    )(serve.ingress()(MeshGateway))
    return cls.bind(records, head_box, sources, list(api_keys))


def start_gateway(
    records: list[DeploymentRecord],
    head_box: str,
    sources: dict[str, Source],
    *,
    host: str,
    port: int,
    api_keys: Sequence[str] = (),
) -> str:
    """(Re)start the gateway with ``records``; returns its base URL (``.../v1``)."""
    serve = require("ray.serve", "mesh")
    try:
        # One HTTP proxy, on the head: ``host`` is the head's mesh address,
        # which no other box could bind.
        serve.start(
            proxy_location="HeadOnly", http_options={"host": host, "port": port}, detached=True
        )
        serve.run(
            gateway_app(records, head_box, sources, api_keys),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
    except Exception as exc:
        raise MeshError(
            f"Ray Serve could not start the mesh gateway on {host}:{port}: {exc}"
        ) from exc
    return f"http://{host}:{port}/v1"


def stop_gateway() -> None:
    """Remove the gateway app; a no-op when Serve is not running."""
    serve = require("ray.serve", "mesh")
    try:
        serve.delete(APP_NAME)
    except serve.exceptions.RayServeException as exc:
        log.debug("no gateway to stop: %s", exc)
