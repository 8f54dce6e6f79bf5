"""What each management action does: the ``Manager`` of one box.

The routes (``edgemesh.gateway.manage``) only parse and delegate to a
manager. ``LocalManager`` is ``edgemesh serve``'s: the box is the whole
site, a deploy opens the package in this process (the planner's choice of
backend and precision for this box), an undeploy closes it.
``edgemesh.gateway.mesh_manager.MeshManager`` is the mesh gateway's.
On one box a graph (vision) package deploys too: it is opened with the
engine and precision ``edgemesh serve --model DIR`` would pick and served
over ``/v2`` beside the LLMs (``app.state.graphs``); it has no plan.

Actions that take long run as jobs (``edgemesh.gateway.jobs``) and leave an
event (``edgemesh.gateway.events``) whether they succeed or fail.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemesh import __version__
from edgemesh.errors import ConflictError, EdgemeshError, NotFoundError
from edgemesh.gateway.events import EventLog
from edgemesh.gateway.jobs import JOBS_FILE, Job, Jobs
from edgemesh.gateway.packages import describe, find_packages

if TYPE_CHECKING:
    from fastapi import FastAPI

    from edgemesh.gateway.service import ModelService
    from edgemesh.local import LocalOptions

log = logging.getLogger(__name__)


@functools.cache
def engines_here() -> list[str]:
    """The inference runtimes installed on this box, llama.cpp included
    (the fingerprint's ``backends`` are what the hardware calls for, which
    leaves llama.cpp out on x86 even when a GGUF model runs on it)."""
    from edgemesh.backends import registry
    from edgemesh.fingerprint.policy import installed

    return installed(registry.names())


def box_uptime_s(root: str = "/") -> float | None:
    try:
        return round(float((Path(root) / "proc/uptime").read_text().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


def this_box_live() -> dict[str, Any]:
    """What each box reports about itself (also run as a Ray task per box)."""
    from edgemesh.fingerprint.sensors import live_dict

    return {"live": live_dict(), "engines": engines_here(), "uptime_s": box_uptime_s()}


def stages_by_box(services: dict[str, ModelService], here: str) -> dict[str, list[dict]]:
    """box id -> the stages it runs, from each model's description."""
    out: dict[str, list[dict]] = {}
    for name, s in services.items():
        for st in s.info.get("stages", []):
            box = here if st.get("box") in (None, "local") else st["box"]
            out.setdefault(box, []).append(
                {
                    "model": name,
                    "layers": st.get("layers"),
                    "backend": st.get("backend") or s.info.get("backend"),
                    "precision": st.get("precision") or s.info.get("precision"),
                }
            )
    return out


def model_view(name: str, s: ModelService, here: str) -> dict[str, Any]:
    stages = [
        {**st, "box": here if st.get("box") in (None, "local") else st["box"]}
        for st in s.info.get("stages", [])
    ]
    return {
        "name": name,
        "kind": "llm",
        "context_length": s.context_length,
        "backend": s.info.get("backend"),
        "precision": s.info.get("precision"),
        "layers": s.info.get("layers"),
        "path": s.info.get("path"),
        "stages": stages,
        "plan": s.info.get("plan_full") or None,
        "load": s.engine.load,
        "stats": s.engine.stats.to_dict(),
    }


class Manager:
    """The actions shared by every gateway; subclasses say what they mean there."""

    mode = "single"
    state_dir: Path | None = None
    """Where the event log and the job history are kept across restarts
    (None: in memory only)."""

    def attach(self, app: FastAPI) -> None:
        self.app = app
        self.events: EventLog = app.state.events
        folder = self.state_dir
        if folder is not None:
            self.events.persist(folder)
        self.jobs = Jobs(on_fail=self._failed, path=folder / JOBS_FILE if folder else None)

    def _failed(self, job: Job, exc: Exception) -> None:
        self.events.add(
            "error",
            f"{job.kind} of {job.target} failed: {exc}",
            level="error",
            model=job.target if job.kind in ("deploy", "undeploy", "replan") else None,
            box=job.target if job.kind in ("drain", "undrain", "remove") else None,
        )

    @property
    def services(self) -> dict[str, ModelService]:
        return self.app.state.services

    @property
    def graphs(self) -> dict[str, Any]:
        """Graph models served over /v2 (``edgemesh.gateway.oip``'s table)."""
        graphs = getattr(self.app.state, "graphs", None)
        if graphs is None:
            graphs = self.app.state.graphs = {}
        return graphs

    # -- reads -------------------------------------------------------------

    def box_id(self) -> str:
        from edgemesh.gateway.dashboard import local_box

        return str(local_box()["id"])

    def overview(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "mode": self.mode,
            "mesh": None,
            "head": None,
            "gateway_box": self.box_id(),
            "uptime_s": round(time.time() - self.app.state.started, 1),
            "auth": bool(getattr(self.app.state, "auth", False)),
            "boxes": len(self.boxes()["boxes"]),
            "models": len(self.services),
        }

    def boxes(self) -> dict[str, Any]:
        raise NotImplementedError

    def refresh_events(self) -> None:
        """Pull events recorded elsewhere (the mesh agent's log) into the log."""

    def models(self) -> list[dict[str, Any]]:
        here = self.box_id()
        return [model_view(n, s, here) for n, s in self.services.items()]

    def packages(self) -> dict[str, Any]:
        raise NotImplementedError

    def join_info(self) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self, package: str, box: str | None = None, name: str | None = None) -> dict:
        raise NotImplementedError

    # -- actions (run as jobs) ----------------------------------------------

    def deploy(self, package: str, *, box: str | None, name: str | None, plan: dict | None) -> Job:
        raise NotImplementedError

    def undeploy(self, name: str) -> Job:
        raise NotImplementedError

    def replan(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def apply_replan(self, name: str, plan: dict | None) -> Job:
        raise NotImplementedError

    def drain(self, box: str, on: bool = True) -> Job:
        raise _single_box("drained")

    def remove(self, box: str) -> Job:
        raise _single_box("removed")

    def _service(self, name: str) -> ModelService:
        if name not in self.services:
            raise NotFoundError(
                f"the model '{name}' is not served here; served: "
                f"{', '.join(self.services) or 'none'}",
                param="name",
                code="model_not_found",
            )
        return self.services[name]


def _graph_view(service: Any) -> dict[str, Any]:
    choice = getattr(service, "choice", None)
    return {
        "backend": getattr(choice, "backend", None),
        "precision": getattr(choice, "precision", None),
        "path": str(getattr(service, "root", "")) or None,
    }


def _single_box(what: str) -> ConflictError:
    return ConflictError(
        f"this gateway serves one box (edgemesh serve), which cannot be {what}: there is "
        "no other box to move its models to; run `edgemesh join` to make a mesh",
        code="not_supported_here",
    )


def _package(path: str) -> dict[str, Any]:
    info = describe(Path(path).expanduser())
    if info is None:
        raise NotFoundError(
            f"'{path}' is not a model package (no manifest.json or graph.json)",
            param="package",
            code="package_not_found",
        )
    return info


class LocalManager(Manager):
    """``edgemesh serve``: this box is the site."""

    mode = "single"

    def __init__(
        self, options: LocalOptions | None = None, *, state_dir: Path | None = None
    ) -> None:
        from edgemesh.local import LocalOptions

        self.options = options or LocalOptions()
        self.state_dir = state_dir

    def boxes(self) -> dict[str, Any]:
        from edgemesh.gateway.dashboard import local_box

        me = local_box()
        row = {
            "id": me["id"],
            "role": "single",
            "address": me.get("address", "127.0.0.1"),
            "health": me.get("health", "ok"),
            "draining": False,
            "gateway": True,
            "started": self.app.state.started,
            "version": __version__,
            "summary": me.get("summary", {}),
            "stages": stages_by_box(self.services, me["id"]).get(me["id"], []),
            "live": None,
            "live_error": None,
        }
        try:
            row.update(this_box_live())
        except (OSError, EdgemeshError) as exc:  # a box without /proc still lists
            row["live_error"] = f"{type(exc).__name__}: {exc}"
        return {"boxes": [row], "lost": []}

    def _paths(self) -> dict[str, str]:
        """Served name -> package folder, LLMs and graphs alike."""
        out = {n: str(s.info.get("path")) for n, s in self.services.items() if s.info.get("path")}
        for n, g in self.graphs.items():
            root = getattr(g, "root", None)
            if root is not None:
                out[n] = str(Path(root).resolve())
        return out

    def packages(self) -> dict[str, Any]:
        here = self.box_id()
        served = self._paths()
        found = find_packages(p for p in served.values() if p and Path(p).is_dir())
        for p in found:
            p["box"] = here
            p["deployed_as"] = sorted(n for n, path in served.items() if path == p["path"])
        return {"packages": found, "errors": {}}

    def join_info(self) -> dict[str, Any]:
        return {
            "mesh": None,
            "command": "edgemesh join --mesh NAME --secret-file <copied file>",
            "secret_file": None,
            "secret_id": None,
            "copy_command": None,
            "steps": [
                "This gateway serves one box alone (edgemesh serve); boxes are added to a mesh.",
                "On this box run: edgemesh join --mesh site  (it creates the mesh secret "
                "and prints where it is, mode 0600).",
                "Copy that file to the new box, keeping it private: "
                "scp -p <secret file> newbox:edgemesh-site.secret",
                "On the new box run: edgemesh join --mesh site --secret-file edgemesh-site.secret",
                "Then deploy with edgemesh deploy PACKAGE; its gateway shows every box here.",
            ],
        }

    def _profile(self) -> dict[str, Any]:
        from edgemesh.fingerprint import usable_profile

        return usable_profile(self.box_id())

    def plan(self, package: str, box: str | None = None, name: str | None = None) -> dict:
        from edgemesh.sharding.package.folder import open_package
        from edgemesh.sharding.planner.plan import plan

        info = _package(package)
        if info["kind"] != "llm":
            raise ConflictError(
                f"'{info['name']}' is a graph model: it runs whole on one box, there is "
                "nothing to plan; serve it with the graph gateway (/v2)",
                code="not_supported_here",
            )
        manifest = open_package(info["path"]).manifest
        return {"plan": plan(manifest, [self._profile()]).to_dict(), "package": info}

    def deploy(self, package: str, *, box: str | None, name: str | None, plan: dict | None) -> Job:
        info = _package(package)
        name = name or info["name"]
        if name in self.services or name in self.graphs:
            raise ConflictError(
                f"a model named '{name}' is already served; undeploy it first or pick another name",
                param="name",
                code="model_exists",
            )
        if info["kind"] == "graph":
            if plan is not None:
                raise ConflictError(
                    f"'{info['name']}' is a graph model: it runs whole on this box, "
                    "there is no plan to give; deploy it without one",
                    param="plan",
                    code="invalid_plan",
                )
            return self.jobs.start("deploy", name, lambda job: self._deploy_graph(info, name, job))
        return self.jobs.start("deploy", name, lambda job: self._deploy(info, name, plan))

    def _deploy_graph(self, info: dict, name: str, job: Job) -> tuple[str, Any]:
        from edgemesh.graph.service import GraphServeOptions, load_graph_service

        job.message = "choosing the engine and precision (may compile)"
        service = load_graph_service(
            info["path"], GraphServeOptions(name=name, threads=self.options.limits.threads)
        )
        if name in self.graphs or name in self.services:  # deployed twice at once
            service.close()
            raise ConflictError(f"'{name}' was deployed meanwhile", code="model_exists")
        self.graphs[name] = service
        choice = service.choice
        msg = (
            f"deployed graph '{name}' on {self.box_id()}: {choice.backend}/{choice.precision} "
            f"({choice.reason}); served on /v2/models/{name}"
        )
        self.events.add("deploy", msg, model=name, box=self.box_id())
        return msg, {"name": name, "kind": "graph", **_graph_view(service)}

    def _deploy(self, info: dict, name: str, plan: dict | None) -> tuple[str, Any]:
        from edgemesh.local import load_package_service
        from edgemesh.models import ModelSource
        from edgemesh.sharding.planner.plan import Plan

        chosen = Plan.from_dict(plan) if plan is not None else None
        if chosen is None:
            chosen = Plan.from_dict(self.plan(info["path"])["plan"])
        if len(chosen.stages) != 1:
            raise ConflictError(
                f"the plan has {len(chosen.stages)} stages; one box runs one", code="invalid_plan"
            )
        stage = chosen.stages[0]
        options = replace(self.options, backend=stage.backend, precision=stage.precision)
        service = load_package_service(ModelSource(name, Path(info["path"]), "package"), options)
        service.info["plan_full"] = chosen.to_dict()
        if name in self.services:  # deployed twice at once under one name
            service.close()
            raise ConflictError(f"'{name}' was deployed meanwhile", code="model_exists")
        self.services[name] = service
        msg = (
            f"deployed '{name}' on {self.box_id()}: {stage.backend}/{stage.precision}, "
            f"predicted {chosen.predicted_tokens_per_s:.1f} tok/s"
        )
        self.events.add("deploy", msg, model=name, box=self.box_id())
        return msg, model_view(name, service, self.box_id())

    def undeploy(self, name: str) -> Job:
        if name in self.graphs:
            return self.jobs.start("undeploy", name, lambda job: self._undeploy_graph(name))
        self._service(name)
        return self.jobs.start("undeploy", name, lambda job: self._undeploy(name))

    def _undeploy(self, name: str) -> tuple[str, Any]:
        service = self.services.pop(name, None)
        if service is None:
            raise NotFoundError(f"'{name}' is no longer served", code="model_not_found")
        service.close()
        msg = f"undeployed '{name}'"
        self.events.add("undeploy", msg, model=name, box=self.box_id())
        return msg, None

    def _undeploy_graph(self, name: str) -> tuple[str, Any]:
        service = self.graphs.pop(name, None)
        if service is None:
            raise NotFoundError(f"'{name}' is no longer served", code="model_not_found")
        service.close()
        msg = f"undeployed graph '{name}' (/v2/models/{name})"
        self.events.add("undeploy", msg, model=name, box=self.box_id())
        return msg, None

    def replan(self, name: str) -> dict[str, Any]:
        service = self._service(name)
        path = service.info.get("path")
        if not path or describe(Path(path)) is None:
            raise ConflictError(
                f"'{name}' is not a package (a GGUF file runs whole on llama.cpp): "
                "nothing to re-plan",
                code="not_supported_here",
            )
        return {"current": service.info.get("plan_full"), "proposed": self.plan(path)["plan"]}

    def apply_replan(self, name: str, plan: dict | None) -> Job:
        service = self._service(name)
        proposed = plan or self.replan(name)["proposed"]
        path = service.info["path"]

        def run(job: Job) -> tuple[str, Any]:
            self._undeploy(name)
            msg, result = self._deploy(_package(path), name, proposed)
            self.events.add("replan", f"re-planned '{name}': {msg}", model=name)
            return msg, result

        return self.jobs.start("replan", name, run)
