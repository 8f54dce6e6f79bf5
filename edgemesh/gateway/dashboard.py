"""The web dashboard: devices, models, monitoring and events of a site.

``GET /dashboard`` is a static page (``dashboard.html`` with
``dashboard.js``/``dashboard.css`` under ``/dashboard/static/``) built only
on the management API (``/api/...``, docs/API.md): whatever the page shows
or does, a script can too. The page and its static files carry no data, so
they are open; every ``/api`` call needs the API key when one is set, and
the page asks for it on the first 401.

``GET /dashboard/state`` stays for scripts written against the first
dashboard: the boxes (from the manager unless a provider is given) and the
models with their counters.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from edgemesh import __version__
from edgemesh.errors import NotFoundError

log = logging.getLogger(__name__)

BoxesProvider = Callable[[], list[dict[str, Any]]]
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@functools.cache
def local_box() -> dict[str, Any]:
    """This box as the dashboard lists it (fingerprinted once per process)."""
    from edgemesh.errors import EdgemeshError
    from edgemesh.fingerprint import collect

    try:
        fp = collect()
    except (OSError, EdgemeshError) as exc:
        # The dashboard must still work on a box whose fingerprint fails.
        log.warning("could not fingerprint this box for the dashboard: %s", exc)
        return {"id": "local", "role": "single", "health": "ok", "summary": {}}
    return {
        "id": fp.id,
        "role": "single",
        "address": "127.0.0.1",
        "health": "ok",
        "summary": fp.summary(),
    }


def local_boxes() -> list[dict[str, Any]]:
    return [local_box()]


@functools.cache
def _file(name: str) -> str:
    return resources.files("edgemesh.gateway").joinpath(name).read_text()


def install(app: FastAPI, boxes: BoxesProvider | None = None) -> None:
    def provider() -> list[dict[str, Any]]:
        if boxes is not None:
            return boxes()
        return app.state.manager.boxes()["boxes"]

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_file("dashboard.html"))

    @app.get("/dashboard/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC:
            raise NotFoundError(f"no static file '{name}'", code="not_found")
        return Response(
            _file(name), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"}
        )

    @app.get("/dashboard/state")
    async def state() -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        try:
            box_list = await run_in_threadpool(provider)
            box_error = None
        except Exception as exc:  # shown on the page: a broken provider must not break it
            log.warning("the dashboard could not list the boxes: %s", exc)
            box_list, box_error = [], f"{type(exc).__name__}: {exc}"
        return {
            "version": __version__,
            "time": time.time(),
            "uptime_s": round(time.time() - app.state.started, 1),
            "boxes": box_list,
            "boxes_error": box_error,
            "models": [
                {
                    "name": name,
                    "context_length": s.context_length,
                    "info": s.info,
                    "load": s.engine.load,
                    "stats": s.engine.stats.to_dict(),
                }
                for name, s in app.state.services.items()
            ],
        }
