"""FastAPI app: the OpenAI API (/v1/...), /health, /metrics, and the routers
of the dashboard, management API and /v2 installed beside them.

Handlers parse the body themselves (not FastAPI's body injection) so every
bad input, invalid JSON included, gets an OpenAI-style 4xx instead of 422;
the OpenAPI schema (``/openapi.json``) still describes each body
(``edgemesh.gateway.openapi``). Streaming uses server-sent events; a client
that disconnects cancels its sequences, which frees the KV cache on every
shard. Every response carries ``x-request-id`` (``edgemesh.gateway.observe``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from edgemesh import __version__
from edgemesh.errors import RequestError
from edgemesh.gateway import (
    dashboard,
    errors,
    extras,
    manage,
    observe,
    oip,
    openai_api,
    openapi,
)
from edgemesh.gateway.service import ModelService

_OPEN_PATHS = {"/health", "/", "/dashboard"}
_OPEN_PREFIXES = ("/dashboard/static/",)  # the page's JS and CSS: no data in them


def create_app(
    services: Sequence[ModelService],
    *,
    api_keys: Sequence[str] = (),
    boxes: dashboard.BoxesProvider | None = None,
    manager: manage.Manager | None = None,
    graphs: Sequence[Any] = (),
) -> FastAPI:
    """Build the gateway for ``services``; ``api_keys`` empty = no auth.

    ``boxes`` lists the mesh's boxes for the dashboard (default: the manager's);
    ``manager`` runs the /api management actions (default: this box alone)."""
    app = FastAPI(title="edgemesh", version=__version__, docs_url=None, redoc_url=None)
    app.state.services = {s.name: s for s in services}
    app.state.started = time.time()
    errors.install(app)
    oip.install(app, graphs)  # /v2 (KServe v2) for graph models, edgemesh.gateway.oip
    manage.install(app, manager, auth=bool(api_keys))
    dashboard.install(app, boxes)
    if api_keys:
        app.add_middleware(_ApiKeys, keys=tuple(api_keys))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": list(app.state.services),
            "uptime_s": round(time.time() - app.state.started, 1),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [_model_card(s) for s in app.state.services.values()],
        }

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return _model_card(_service(app, model_id, param="model_id"))

    openai_api.install(app, lambda name: _service(app, name))
    extras.install(app, lambda name: _service(app, name))
    observe.install(app, boxes)
    openapi.install(app)
    return app


class _ApiKeys(BaseHTTPMiddleware):
    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        super().__init__(app)
        # "sha256:<hex>" entries (the mesh gateway's, from its records) are
        # compared as digests; the others as the keys themselves.
        self._keys = tuple(k.encode() for k in keys if not k.startswith("sha256:"))
        self._digests = tuple(k[7:].encode() for k in keys if k.startswith("sha256:"))

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path in _OPEN_PATHS or request.url.path.startswith(_OPEN_PREFIXES):
            return await call_next(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        digest = hashlib.sha256(given).hexdigest().encode()
        ok = any(hmac.compare_digest(given, k) for k in self._keys) or any(
            hmac.compare_digest(digest, d) for d in self._digests
        )
        if scheme.lower() != "bearer" or not ok:
            return errors.error_response(
                "invalid or missing API key (Authorization: Bearer)", 401, code="invalid_api_key"
            )
        return await call_next(request)


def _model_card(s: ModelService) -> dict[str, Any]:
    return {
        "id": s.name,
        "object": "model",
        "created": s.created,
        "owned_by": "edgemesh",
        "context_length": s.context_length,
        **({"edgemesh": s.info} if s.info else {}),
    }


def _service(app: FastAPI, name: str, param: str = "model") -> ModelService:
    services: dict[str, ModelService] = app.state.services
    if name not in services:
        raise _NotFound(
            f"the model '{name[:200]}' does not exist; available: {', '.join(services)}", param
        )
    return services[name]


class _NotFound(RequestError):
    status = 404

    def __init__(self, message: str, param: str = "model") -> None:
        super().__init__(message, param=param, code="model_not_found")
