"""The web dashboard: boxes, the shard map and live performance.

``GET /dashboard`` is a static page that polls ``GET /dashboard/state``.
The page computes rates (tokens/s) from successive counter snapshots, so the
server only reports what it counted and nothing here is an estimate.

Where the box list comes from depends on who serves the gateway: a single
box reports its own fingerprint; the mesh gateway passes a provider that
reads the mesh's membership.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from edgemesh import __version__

log = logging.getLogger(__name__)

BoxesProvider = Callable[[], list[dict[str, Any]]]


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
def _page() -> str:
    return resources.files("edgemesh.gateway").joinpath("dashboard.html").read_text()


def install(app: FastAPI, boxes: BoxesProvider | None = None) -> None:
    provider = boxes or local_boxes

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/dashboard/state")
    async def state() -> dict[str, Any]:
        try:
            box_list = provider()
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
