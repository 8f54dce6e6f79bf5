"""Request ids, request metrics and the metrics routes.

``RequestIds`` is plain ASGI middleware (not Starlette's BaseHTTPMiddleware,
which would buffer streams and hide client disconnects): it takes the
client's ``x-request-id`` when it is sane (printable ASCII, at most 128
characters) or makes one, puts it in ``request_id`` for the logs, sends it
back, counts the request by route template and status, and logs one access
line carrying the id.

Routes: ``GET /metrics`` (Prometheus text), ``GET /metrics/json`` (what
``/metrics`` used to return), ``GET /metrics/targets`` (Prometheus http_sd:
the gateway and every box's exporter).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from edgemesh.gateway import dashboard
from edgemesh.gateway.metrics import GatewayMetrics, sd_targets

log = logging.getLogger("edgemesh.gateway.access")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the request being served (``-`` outside one)."""

_MAX_ID = 128


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` so a log format can print ``%(request_id)s``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _sane(value: str) -> bool:
    return 0 < len(value) <= _MAX_ID and all(33 <= ord(c) < 127 for c in value)


class RequestIds:
    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        ident = given if _sane(given) else "req-" + uuid.uuid4().hex[:24]
        token = request_id.set(ident)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", ident.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.duration.labels(path).observe(elapsed)
            log.info(
                "%s %s -> %d in %.1f ms [request %s]",
                scope.get("method"),
                scope.get("path"),
                status,
                elapsed * 1000,
                ident,
            )
            request_id.reset(token)


def install(app: FastAPI, boxes: dashboard.BoxesProvider | None) -> None:
    metrics = GatewayMetrics(lambda: dict(app.state.services))
    app.state.metrics = metrics
    app.add_middleware(RequestIds, metrics=metrics)

    def provider() -> list[dict[str, Any]]:
        # The dashboard's source of boxes: the given provider, else the management
        # API's manager (the mesh's members), else this box.
        if boxes is not None:
            return boxes()
        manager = getattr(app.state, "manager", None)
        if manager is not None:
            return list(manager.boxes()["boxes"])
        return dashboard.local_boxes()

    @app.get("/metrics", include_in_schema=True)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/json")
    async def metrics_json() -> dict[str, Any]:
        return {
            name: {"load": s.engine.load, **s.engine.stats.to_dict(), "info": s.info}
            for name, s in app.state.services.items()
        }

    @app.get("/metrics/targets")
    async def targets(request: Request) -> JSONResponse:
        try:
            box_list = await asyncio.to_thread(provider)
        except Exception as exc:  # http_sd must still list the gateway itself
            log.warning("could not list the boxes for http_sd: %r", exc)
            box_list = []
        return JSONResponse(sd_targets(box_list, request.url.netloc))
