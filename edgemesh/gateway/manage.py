"""The management routes, ``/api/...`` (docs/API.md), over a ``Manager``.

Handlers parse the body and delegate; what an action means on one box or
on the mesh lives in the manager. Auth is the gateway's API-key middleware
(every ``/api`` path needs the key when one is set), so nothing here checks
it again. Blocking work (Ray calls, fingerprinting, planning) runs in
Starlette's thread pool, never on the event loop.
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edgemesh.errors import RequestError
from edgemesh.gateway.body import parse_json, read_body
from edgemesh.gateway.events import EventLog
from edgemesh.gateway.history import History
from edgemesh.gateway.manager import LocalManager, Manager


async def _body(request: Request) -> dict[str, Any]:
    # Read and parsed as the OpenAI routes' bodies are (size cap, strict UTF-8,
    # bounded nesting): a bad body is a 400, never a 500. Empty means {}.
    raw = await read_body(request)
    return parse_json(raw or b"{}")


@overload
def _str(body: dict[str, Any], key: str, *, required: Literal[True]) -> str: ...
@overload
def _str(body: dict[str, Any], key: str, *, required: bool = False) -> str | None: ...
def _str(body: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(f"'{key}' is required", param=key, code="invalid_value")
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"'{key}' must be a non-empty string", param=key, code="invalid_value")
    return value.strip()


def _plan(body: dict[str, Any]) -> dict[str, Any] | None:
    plan = body.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise RequestError("'plan' must be a plan object (from /api/plan)", param="plan")
    return plan


def _accepted(job: Any) -> JSONResponse:
    return JSONResponse({"job": job.to_dict()}, status_code=202)


def _number(request: Request, key: str, default: float, lo: float, hi: float) -> float:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RequestError(f"'{key}' must be a number", param=key, code="invalid_value") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be in [{lo:g}, {hi:g}]", param=key, code="invalid_value")
    return value


def install(app: FastAPI, manager: Manager | None = None, *, auth: bool = False) -> Manager:
    """Add the ``/api`` routes, the event log and the monitoring history to ``app``."""
    app.state.auth = auth
    if not hasattr(app.state, "events"):
        app.state.events = EventLog()
    mgr = manager or LocalManager()
    mgr.attach(app)
    app.state.manager = mgr
    history = History(app)
    app.state.history = history
    history.start()
    app.router.on_shutdown.append(history.stop)
    app.state.events.add("start", f"gateway started ({mgr.mode})", box=None)

    @app.get("/api/overview")
    async def overview() -> dict[str, Any]:
        return await run_in_threadpool(mgr.overview)

    @app.get("/api/boxes")
    async def boxes() -> dict[str, Any]:
        return await run_in_threadpool(mgr.boxes)

    @app.post("/api/boxes/{box}/drain")
    async def drain(box: str) -> JSONResponse:
        return _accepted(await run_in_threadpool(mgr.drain, box, True))

    @app.post("/api/boxes/{box}/undrain")
    async def undrain(box: str) -> JSONResponse:
        return _accepted(await run_in_threadpool(mgr.drain, box, False))

    @app.delete("/api/boxes/{box}")
    async def remove(box: str) -> JSONResponse:
        return _accepted(await run_in_threadpool(mgr.remove, box))

    @app.get("/api/join")
    async def join() -> dict[str, Any]:
        return await run_in_threadpool(mgr.join_info)

    @app.get("/api/packages")
    async def packages() -> dict[str, Any]:
        return await run_in_threadpool(mgr.packages)

    @app.post("/api/plan")
    async def plan(request: Request) -> dict[str, Any]:
        body = await _body(request)
        return await run_in_threadpool(
            mgr.plan, _str(body, "package", required=True), _str(body, "box"), _str(body, "name")
        )

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        return {"models": await run_in_threadpool(mgr.models), "graph_models": _graphs(app)}

    @app.post("/api/models")
    async def deploy(request: Request) -> JSONResponse:
        body = await _body(request)
        package = _str(body, "package", required=True)
        job = await run_in_threadpool(
            lambda: mgr.deploy(
                package, box=_str(body, "box"), name=_str(body, "name"), plan=_plan(body)
            )
        )
        return _accepted(job)

    @app.delete("/api/models/{name}")
    async def undeploy(name: str) -> JSONResponse:
        return _accepted(await run_in_threadpool(mgr.undeploy, name))

    @app.post("/api/models/{name}/replan")
    async def replan(name: str, request: Request) -> Any:
        body = await _body(request)
        apply = body.get("apply", False)
        if not isinstance(apply, bool):
            raise RequestError("'apply' must be true or false", param="apply")
        if apply:
            return _accepted(await run_in_threadpool(mgr.apply_replan, name, _plan(body)))
        return await run_in_threadpool(mgr.replan, name)

    @app.get("/api/jobs")
    async def jobs() -> dict[str, Any]:
        return {"jobs": [j.to_dict() for j in mgr.jobs.list()]}

    @app.get("/api/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        return mgr.jobs.get(job_id).to_dict()

    @app.get("/api/monitor")
    async def monitor(request: Request) -> dict[str, Any]:
        return history.window(_number(request, "window_s", 600, 10, history.window_s))

    @app.get("/api/events")
    async def events(request: Request) -> dict[str, Any]:
        since = int(_number(request, "since", 0, 0, 1e15))
        limit = int(_number(request, "limit", 200, 1, 1000))
        await run_in_threadpool(mgr.refresh_events)
        log: EventLog = app.state.events
        found = log.since(since, limit)
        return {"events": [e.to_dict() for e in found], "next": log.last_seq}

    return mgr


def _graphs(app: FastAPI) -> list[dict[str, Any]]:
    """Graph (vision) models served over /v2, when the gateway has any."""
    graphs = getattr(app.state, "graphs", None) or {}
    items = graphs.values() if isinstance(graphs, dict) else graphs
    out = []
    for g in items:
        try:
            meta = dict(g.metadata())
        except Exception as exc:  # listed with the reason rather than hidden
            meta = {"name": getattr(g, "name", "?"), "error": repr(exc)}
        choice = getattr(g, "choice", None)  # GraphService: the runtime it picked
        for key in ("backend", "precision"):
            value = getattr(choice, key, None) if choice is not None else getattr(g, key, None)
            meta.setdefault(key, value if isinstance(value, str) or value is None else str(value))
        root = getattr(g, "root", None)  # the package folder, so the page can undeploy it
        meta["path"] = str(root) if root is not None else None
        meta["served_as"] = getattr(g, "name", meta.get("name"))
        out.append(meta)
    return out
