"""The mesh gateway's ``Manager``: every box of the mesh, from the head.

Runs in the gateway's Ray Serve replica on the head (``router.serve``).
What it reads:

- the boxes and the lost ones: the head agent's ``state.json`` (its verified
  mDNS membership plus Ray's node table), found through
  ``$EDGEMESH_STATE_DIR``, which the agent sets for its Ray processes; without
  it, Ray's node table alone;
- each box's live readings and packages: a tiny Ray task pinned to the box
  (``box:<id>`` resource, no CPU), so the figures come from that box's own
  sysfs. A background thread refreshes the readings every ``LIVE_PERIOD_S``
  so a page load never waits on a box that stopped answering;
- the events: the agent's ``events.jsonl`` (joins, leaves, crashes, heads)
  merged into the gateway's log, plus this replica's own (deploys, re-plans,
  recoveries, errors).

Deploy, undeploy, re-plan and drain act inside this replica: a new model is
planned, its package mirrored to the head and its pipeline opened here, and
the deployment records (GCS KV) are updated so a new head restores the same
set. The replica is never restarted for it, so live streams of the other
models go on.

A re-plan applied from the page and a drain move a model's stages live, the
way a join does (``RayPipeline.move``: in-flight steps finish, new stages
start, live sequences are replayed onto them), so its streams go on too.
Only a model served in-process on the head (a one-stage plan there) has no
stages to move: it is deployed again, which cuts its streams; ``replan``
says which (``live``) so the page can warn first.

Drained boxes are kept in the records (``drained``) and handed to every
pipeline's placer, which leaves them out of every later plan (after a join,
a loss or a re-plan) while they stay alive and announcing, until Undrain.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemesh.errors import ConflictError, NotFoundError
from edgemesh.gateway.jobs import Job
from edgemesh.gateway.manager import Manager, model_view, stages_by_box
from edgemesh.gateway.mesh_boxes import (
    LivePoller,
    find_packages_here,
    package_kind,
    read_graph_manifest,
    read_manifest,
    stop_agent,
)

if TYPE_CHECKING:
    from edgemesh.mesh.deployment_record import Deployments, StageInfo
    from edgemesh.sharding.planner.plan import Plan

log = logging.getLogger(__name__)

PACKAGES_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
"""A plan or a deploy reads the package's manifest with a task on its box:
one the user waits for, which on a busy small box first starts a Ray
worker there (seconds to tens of seconds), so it gets longer than the
page's package listing, which must not hang on a silent box."""
REMOVE_TIMEOUT_S = 90.0


class MeshManager(Manager):
    mode = "mesh"

    def __init__(self, head_box: str, watcher: Any, sources: dict[str, Any]) -> None:
        import ray

        self._ray = ray
        self.head_box = head_box
        self.watcher = watcher
        self.sources = dict(sources)
        folder = os.environ.get("EDGEMESH_STATE_DIR")
        self.state_dir = Path(folder) if folder else None
        self.live = LivePoller(ray)
        self.live.start()
        self._moving: set[str] = set()  # models moved from the page (not a recovery)

    def attach(self, app: Any) -> None:
        super().attach(app)
        try:
            self._exclude(set(self._records().drained))
        except Exception as exc:  # a later drain/undrain sets it again
            log.warning("could not read the drained boxes from the records: %r", exc)
        # The models this gateway was started with (by `edgemesh deploy`, or a
        # restore on a new head); their records may still be in the making
        # (deploy writes them once the gateway is up), so the stages come
        # from the services and the time from a record when there is one.
        try:
            records = self._records().models
        except Exception as exc:  # the log is a convenience: serving goes on
            log.warning("could not read the deployment records for the event log: %r", exc)
            records = {}
        for name, service in sorted(self.services.items()):
            record = records.get(name)
            where = ", ".join(
                f"{st.get('box')} {st.get('layers')}" for st in service.info.get("stages", [])
            )
            self.events.add(
                "deploy",
                f"serving '{name}': {where}",
                model=name,
                box=record.package.origin_box if record else None,
                at=record.deployed if record and record.deployed else time.time(),
            )

    def _exclude(self, drained: set[str]) -> None:
        """Hand the drained boxes to every served model's placer."""
        for service in self.services.values():
            placer = getattr(service.engine.pipeline, "placer", None)
            if placer is not None and hasattr(placer, "exclude"):
                placer.exclude(drained)

    def _live_move(self, service: Any) -> bool:
        pipe = service.engine.pipeline
        placer = getattr(pipe, "placer", None)
        return hasattr(pipe, "move") and hasattr(placer, "adopt")

    # -- what the head knows ------------------------------------------------

    def box_id(self) -> str:
        return self.head_box

    def _agent_state(self) -> dict[str, Any] | None:
        if self.state_dir is None:
            return None
        from edgemesh.mesh.status import read_agent_state

        return read_agent_state(self.state_dir)

    def _records(self) -> Deployments:
        from edgemesh.mesh.deployments import load

        return load(self._ray)

    def _save(self, records: Deployments) -> None:
        from edgemesh.mesh.deployments import save

        save(self._ray, records, None)

    def _alive(self) -> list[Any]:
        from edgemesh.router.profiles import mesh_boxes

        return mesh_boxes(self._ray)

    def overview(self) -> dict[str, Any]:
        out = super().overview()
        doc = self._agent_state() or {}
        out.update(mesh=doc.get("mesh"), head=doc.get("head") or self.head_box)
        return out

    def boxes(self) -> dict[str, Any]:
        from edgemesh.mesh.status import health

        doc = self._agent_state()
        records = self._records()
        drained = set(records.drained)
        forgotten = records.forgotten
        stages = stages_by_box(self.services, self.head_box)
        alive = {b.id: b for b in self._alive()}
        live = self.live.readings()
        rows = []
        if doc is not None:
            members = doc.get("members", [])
        else:  # no agent state here: Ray's node table is all we have
            members = [
                {
                    "id": b.id,
                    "role": "head" if b.is_head else "worker",
                    "address": b.address,
                    "ready": True,
                    "ray_alive": True,
                }
                for b in alive.values()
            ]
        for m in members:
            box = m["id"]
            h = health(m)
            got = live.get(box, {})
            rows.append(
                {
                    "id": box,
                    "role": m.get("role"),
                    "address": m.get("address"),
                    "health": "draining" if box in drained and h == "ok" else h,
                    "draining": box in drained,
                    "gateway": box == self.head_box,
                    "started": m.get("started"),
                    "version": m.get("version"),
                    "summary": m.get("fingerprint") or m.get("summary") or {},
                    "stages": stages.get(box, []),
                    "live": got.get("live"),
                    "engines": got.get("engines", []),
                    "uptime_s": got.get("uptime_s"),
                    "live_error": got.get("error"),
                }
            )
        lost = [
            {"id": x["id"], "at": x["at"], "reason": x["reason"]}
            for x in (doc or {}).get("lost", [])
            if x["id"] not in alive and float(forgotten.get(x["id"], 0)) < float(x["at"])
        ]
        lost.sort(key=lambda x: -x["at"])
        return {"boxes": rows, "lost": lost}

    def refresh_events(self) -> None:
        if self.state_dir is not None:
            self.events.merge_agent_log(self.state_dir / "events.jsonl")

    def join_info(self) -> dict[str, Any]:
        from edgemesh.mesh.config import load_settings, read_secret

        doc = self._agent_state() or {}
        mesh = doc.get("mesh", "default")
        settings = load_settings(self.state_dir) if self.state_dir else None
        secret_path = (
            settings.secret_file
            if settings is not None and settings.secret_file
            else (self.state_dir / "secret" if self.state_dir else None)
        )
        key_id = None
        if secret_path is not None:
            try:
                key_id = read_secret(Path(secret_path)).key_id()
            except Exception as exc:  # shown as unknown; the join still works
                log.warning("cannot read the mesh secret for its id: %s", exc)
        head = doc.get("address") or self.head_box
        command = f"edgemesh join --mesh {mesh} --secret-file edgemesh-{mesh}.secret"
        return {
            "mesh": mesh,
            "command": command,
            "secret_file": str(secret_path) if secret_path else None,
            "secret_id": key_id,
            "copy_command": (
                f"scp -p {head}:{secret_path} NEWBOX:edgemesh-{mesh}.secret"
                if secret_path
                else None
            ),
            "steps": [
                f"The new box needs edgemesh installed and the secret of mesh '{mesh}'.",
                f"Copy the secret file from the head ({secret_path}) to the new box; it is "
                "private (mode 0600): copy the file, never paste its content anywhere.",
                f"On the new box: {command}",
                "It appears here within seconds; running models re-plan onto it when that "
                "is faster.",
            ],
        }

    def packages(self) -> dict[str, Any]:
        ray = self._ray
        task = ray.remote(find_packages_here)
        doc = self._records()
        # (folder, box that deployed it) of each deployed model, by name
        deployed = {n: (r.package.path, r.package.origin_box) for n, r in doc.models.items()}
        deployed |= {n: (g.package_dir, g.origin_box) for n, g in doc.graphs.items()}
        extra = [folder for folder, _ in deployed.values()]
        boxes = [b.id for b in self._alive()]
        refs = {
            b: task.options(resources={f"box:{b}": 0.001}, num_cpus=0).remote(extra) for b in boxes
        }
        found, errors = [], {}
        for box, ref in refs.items():
            try:
                for p in ray.get(ref, timeout=PACKAGES_TIMEOUT_S):
                    p["box"] = box
                    p["deployed_as"] = [
                        n for n, where in deployed.items() if where == (p["path"], box)
                    ]
                    found.append(p)
            except Exception as exc:
                errors[box] = f"{type(exc).__name__}: {exc}"
        return {"packages": found, "errors": errors}

    # -- planning -------------------------------------------------------------

    def _manifest(self, package: str, box: str) -> tuple[bytes, Any]:
        from edgemesh.sharding.package.manifest import Manifest

        task = self._ray.remote(read_manifest)
        ref = task.options(resources={f"box:{box}": 0.001}, num_cpus=0).remote(package)
        raw = self._ray.get(ref, timeout=READ_TIMEOUT_S)
        return raw, Manifest.from_dict(json.loads(raw))

    def _profiles(self) -> list[dict[str, Any]]:
        """The planner's profiles of the boxes alive and not drained: the ones
        the records hold (what the mesh's own re-plans use, e.g. ``--boxes``
        profiles), measured on the box for those without one."""
        from edgemesh.router.profiles import measure_profiles

        doc = self._records()
        drained = set(doc.drained)
        boxes = [b for b in self._alive() if b.id not in drained]
        recorded: dict[str, dict[str, Any]] = {}
        for record in sorted(doc.models.values(), key=lambda r: r.deployed):
            recorded.update({p.id: p.to_dict() for p in record.profiles})
        missing = [b for b in boxes if b.id not in recorded]
        measured = [p.to_dict() for p in measure_profiles(self._ray, missing)] if missing else []
        return [recorded[b.id] for b in boxes if b.id in recorded] + measured

    def _box(self, box: str | None) -> str:
        box = box or self.head_box
        if box not in {b.id for b in self._alive()}:
            raise NotFoundError(f"box '{box}' is not in the mesh now", code="box_not_found")
        return box

    def plan(self, package: str, box: str | None = None, name: str | None = None) -> dict:
        from edgemesh.sharding.planner.plan import plan

        box = self._box(box)
        _raw, manifest = self._manifest(package, box)
        return {
            "plan": plan(manifest, self._profiles()).to_dict(),
            "package": {"path": package, "box": box, "name": manifest.name},
        }

    # -- actions ----------------------------------------------------------------

    def deploy(self, package: str, *, box: str | None, name: str | None, plan: dict | None) -> Job:
        box = self._box(box)
        if self._kind(package, box) == "graph":
            return self._start_graph(package, box, name, plan)
        raw, manifest = self._manifest(package, box)
        name = name or manifest.name
        if name in self.services or name in self.graphs:
            raise ConflictError(
                f"a model named '{name}' is already served; undeploy it first",
                param="name",
                code="model_exists",
            )
        return self.jobs.start(
            "deploy", name, lambda job: self._deploy(package, box, name, raw, manifest, plan, job)
        )

    def _deploy(
        self,
        package: str,
        box: str,
        name: str,
        raw: bytes,
        manifest: Any,
        fixed: dict | None,
        job: Job | None = None,
    ) -> tuple[str, Any]:
        def step(what: str) -> None:  # shown on the page while the job runs
            if job is not None:
                job.message = what

        from edgemesh.router.mirror import mirror_package
        from edgemesh.router.placement import checked_plan
        from edgemesh.router.service import mesh_service
        from edgemesh.sharding.planner.plan import plan

        step("planning")
        profiles = self._profiles()
        alive = {b.id for b in self._alive()}
        placed = checked_plan(fixed, manifest, alive) if fixed else plan(manifest, profiles)
        step(f"copying the package from {box} to the head ({self.head_box})")
        from edgemesh.mesh.deployment_record import DeploymentRecord, PackageRef
        from edgemesh.sharding.planner.boxes import BoxProfile

        ref = PackageRef.from_bytes(raw, path=package, origin_box=box)
        mirror = mirror_package(
            self._ray, name, ref, source_box=box, path=package, head=self.head_box
        )
        doc = self._records()
        record = DeploymentRecord.new(
            name,
            ref,
            placed,
            [BoxProfile.from_dict(p) for p in profiles],
            gateway=doc.gateway_url(),
            deployed=time.time(),
        )
        step("starting the stages: " + ", ".join(st.box for st in record.stages))
        service = mesh_service(
            record,
            here=self.head_box,
            source=mirror,
            on_change=self._on_change,
        )
        service.info["plan_full"] = placed.to_dict()
        placer = getattr(service.engine.pipeline, "placer", None)
        if placer is not None and hasattr(placer, "exclude"):
            placer.exclude(set(doc.drained))
        self.services[name] = service
        self.sources[name] = mirror
        self.watcher.add(service.engine.pipeline)
        doc = self._records()  # again: the stages took a while, others may have written
        doc.models[name] = record
        self._save(doc)
        msg = (
            f"deployed '{name}' from {box}: "
            + ", ".join(
                f"{s.box} [{s.layers.start},{s.layers.stop}) {s.backend}/{s.precision}"
                for s in placed.stages
            )
            + f"; predicted {placed.predicted_tokens_per_s:.1f} tok/s"
        )
        self.events.add("deploy", msg, model=name, box=box)
        return msg, model_view(name, service, self.head_box)

    def _on_change(self, name: str, stages: list[StageInfo], plan: Plan) -> None:
        from edgemesh.mesh.deployments import record_stages

        where = ", ".join(f"{s.box} {list(s.layers)}" for s in stages)
        if name in self.services:
            self.services[name].info["plan_full"] = plan.to_dict()
        if name in self._moving:  # asked for from the page: logged by the action
            record_stages(self._ray, name, stages, plan)
            return
        self.events.add("recover", f"'{name}' stages now on {where}", level="warning", model=name)
        record_stages(self._ray, name, stages, plan)

    def undeploy(self, name: str) -> Job:
        if name in self.graphs:
            return self.jobs.start("undeploy", name, lambda job: self._undeploy_graph(name))
        self._service(name)
        return self.jobs.start("undeploy", name, lambda job: self._undeploy(name))

    # -- graph (vision) models: whole replicas, served on /v2 -----------------

    def _kind(self, package: str, box: str) -> str | None:
        task = self._ray.remote(package_kind)
        ref = task.options(resources={f"box:{box}": 0.001}, num_cpus=0).remote(package)
        return self._ray.get(ref, timeout=READ_TIMEOUT_S)

    def _start_graph(self, package: str, box: str, name: str | None, plan: dict | None) -> Job:
        if plan is not None:
            raise ConflictError(
                "a graph model runs whole on each box that serves it: there is no plan to "
                "give; deploy it without one",
                param="plan",
                code="invalid_plan",
            )
        task = self._ray.remote(read_graph_manifest)
        ref = task.options(resources={f"box:{box}": 0.001}, num_cpus=0).remote(package)
        raw = self._ray.get(ref, timeout=READ_TIMEOUT_S)
        name = name or str(json.loads(raw).get("name") or Path(package).name)
        if name in self.services or name in self.graphs:
            raise ConflictError(
                f"a model named '{name}' is already served; undeploy it first",
                param="name",
                code="model_exists",
            )
        return self.jobs.start(
            "deploy", name, lambda job: self._deploy_graph(package, box, name, raw, job)
        )

    def _deploy_graph(
        self, package: str, box: str, name: str, raw: bytes, job: Job
    ) -> tuple[str, Any]:
        """Replicas on the boxes that serve it best (``graph_deploy.place_replicas``,
        what ``edgemesh deploy DIR`` of a graph does), recorded under ``graphs``,
        then served on /v2 by this replica: no gateway restart, so nothing else
        served is disturbed."""
        from edgemesh.router.graph_place import GraphDeployOptions, graph_record, place_replicas
        from edgemesh.router.graph_replica import GraphSource, open_graph_sets

        doc = self._records()
        drained = set(doc.drained)
        usable = [b.id for b in self._alive() if b.id not in drained]
        job.message = f"opening a replica on {', '.join(usable)} (each picks its engine)"
        options = GraphDeployOptions()
        # An actor handle; ray's annotations type a remote(cls).options() chain
        # as "handle or class", which kill() does not take.
        source: Any = (
            self._ray.remote(GraphSource)
            .options(resources={f"box:{box}": 0.001}, num_cpus=0)
            .remote(package)
        )
        try:
            placed = place_replicas(
                self._ray,
                name,
                raw,
                usable,
                source=source,
                origin_box=box,
                package_dir=package,
                options=options,
            )
        finally:
            self._ray.kill(source)
        doc = self._records()
        base = (doc.gateway or "").removesuffix("/v1")
        record = graph_record(
            name,
            raw,
            package_dir=package,
            origin_box=box,
            placed=placed,
            options=options,
            gateway=f"{base}/v2" if base else None,
        )
        doc.graphs[name] = record
        self._save(doc)
        opened = open_graph_sets(self._ray, {name: record.to_dict()})
        if not opened:
            raise ConflictError(f"the replicas of '{name}' went away while opening", code="busy")
        self.graphs[name] = opened[0]
        where = ", ".join(
            f"{r['box']} {r['backend']}/{r['precision']} ({r.get('p50_ms')} ms)"
            for r in placed.replicas
        )
        refused = "; ".join(f"{b}: {why}" for b, why in sorted(placed.refused.items()))
        msg = f"deployed graph '{name}' from {box}: replicas on {where}" + (
            f"; refused by {refused}" if refused else ""
        )
        self.events.add("deploy", msg, model=name, box=box)
        return msg, {"name": name, "kind": "graph", "replicas": placed.replicas}

    def _undeploy_graph(self, name: str) -> tuple[str, Any]:
        from edgemesh.router.graph_place import remove_replicas

        served = self.graphs.pop(name, None)
        doc = self._records()
        record = doc.graphs.pop(name, None)
        self._save(doc)
        boxes = record.boxes if record is not None else []
        remove_replicas(self._ray, name, boxes)
        if served is not None and hasattr(served, "close"):
            served.close()
        msg = f"undeployed graph '{name}' (replicas on {', '.join(boxes) or 'none'} stopped)"
        self.events.add("undeploy", msg, model=name)
        return msg, None

    def _undeploy(self, name: str) -> tuple[str, Any]:
        from edgemesh.mesh.deployments import RAY_NAMESPACE as NAMESPACE
        from edgemesh.router.mirror import SOURCE_PREFIX

        service = self.services.pop(name, None)
        if service is None:
            raise NotFoundError(f"'{name}' is no longer served", code="model_not_found")
        self.watcher.remove(service.engine.pipeline)
        service.close()
        doc = self._records()
        doc.models.pop(name, None)
        self._save(doc)
        self.sources.pop(name, None)
        try:
            self._ray.kill(self._ray.get_actor(f"{SOURCE_PREFIX}{name}", namespace=NAMESPACE))
        except ValueError:
            pass  # the mirror is already gone
        msg = f"undeployed '{name}'"
        self.events.add("undeploy", msg, model=name)
        return msg, None

    def replan(self, name: str) -> dict[str, Any]:
        from edgemesh.sharding.planner.plan import plan

        service = self._service(name)
        placer = getattr(service.engine.pipeline, "placer", None)
        record = self._records().models.get(name)
        if record is None:
            raise NotFoundError(f"no deployment record for '{name}'", code="model_not_found")
        manifest = record.package.manifest
        current = (placer.plan if placer is not None else record.plan).to_dict()
        return {
            "current": current,
            "proposed": plan(manifest, self._profiles()).to_dict(),
            # True: applying moves the stages with the streams replayed; False:
            # the model is deployed again and its live streams are cut.
            "live": self._live_move(service),
        }

    def apply_replan(self, name: str, plan: dict | None) -> Job:
        self._service(name)
        proposed = plan or self.replan(name)["proposed"]

        def run(job: Job) -> tuple[str, Any]:
            msg = self._apply(name, proposed, job)
            self.events.add("replan", f"re-planned '{name}': {msg}", model=name)
            return msg, model_view(name, self.services[name], self.head_box)

        return self.jobs.start("replan", name, run)

    def _apply(self, name: str, proposed: dict, job: Job | None = None) -> str:
        """Put ``name`` on the ``proposed`` plan: moved live when its pipeline
        can (no stream cut), else undeployed and deployed again."""
        from edgemesh.router.placement import checked_plan

        record = self._records().models[name]
        manifest = record.package.manifest
        placed = checked_plan(proposed, manifest, {b.id for b in self._alive()})
        where = ", ".join(
            f"{s.box} [{s.layers.start},{s.layers.stop}) {s.backend}/{s.precision}"
            for s in placed.stages
        )
        service = self.services[name]
        if self._live_move(service):
            if job is not None:
                job.message = f"moving the stages live to {where}"
            pipe: Any = service.engine.pipeline  # _live_move found its placer and move()
            before = pipe.placer.plan
            self._moving.add(name)
            try:
                moved = pipe.move(pipe.placer.adopt(placed))
            finally:
                self._moving.discard(name)
            if not moved:
                pipe.placer.adopt(before)  # nothing moved: the placer keeps the old plan
                raise ConflictError(
                    f"'{name}' could not be moved now (it is recovering, or broken): "
                    "wait for the recovery in the event log, then try again",
                    code="busy",
                )
            return f"moved live to {where} (streams replayed, none cut)"
        self._undeploy(name)
        msg, _ = self._deploy(
            record.package.path,
            record.package.origin_box or self.head_box,
            name,
            record.package.manifest_bytes,
            manifest,
            placed.to_dict(),
            job,
        )
        return msg + " (deployed again: its streams were cut)"

    def drain(self, box: str, on: bool = True) -> Job:
        if box == self.head_box and on:
            raise ConflictError(
                f"box {box} runs the gateway (the head); drain another box, or stop "
                "`edgemesh join` here to hand the head over",
                code="not_supported_here",
            )
        return self.jobs.start("drain" if on else "undrain", box, lambda job: self._drain(box, on))

    def _drain(self, box: str, on: bool) -> tuple[str, Any]:
        doc = self._records()
        drained = set(doc.drained)
        drained = drained | {box} if on else drained - {box}
        doc.drained = sorted(drained)
        self._save(doc)
        self._exclude(drained)
        moved = []
        if on:
            for name, service in list(self.services.items()):
                if any(st.get("box") == box for st in service.info.get("stages", [])):
                    self._move_off(name, box)
                    moved.append(name)
        msg = (
            f"drained {box}: moved {', '.join(moved) or 'nothing'}"
            if on
            else f"{box} is used again by later plans"
        )
        self.events.add("drain", msg, box=box)
        return msg, {"moved": moved}

    def _move_off(self, name: str, box: str) -> None:
        """Re-place ``name`` without ``box`` (a re-plan over the other boxes, moved live)."""
        proposed = self.replan(name)["proposed"]
        if any(st["box"] == box for st in proposed["stages"]):
            raise ConflictError(f"the planner still puts '{name}' on {box}", code="busy")
        self.events.add("replan", f"'{name}' off {box}: {self._apply(name, proposed)}", model=name)

    def remove(self, box: str) -> Job:
        alive = {b.id for b in self._alive()}
        if box == self.head_box:
            raise ConflictError(
                f"box {box} runs the gateway (the head): stop `edgemesh join` on it instead",
                code="not_supported_here",
            )
        known = alive | {x["id"] for x in self.boxes()["lost"]}
        if box not in known:
            raise NotFoundError(f"no box '{box}' in the mesh", code="box_not_found")
        return self.jobs.start("remove", box, lambda job: self._remove(box, box in alive))

    def _gone(self, box: str, timeout_s: float) -> bool:
        """Whether ``box`` leaves Ray's alive nodes within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if box not in {b.id for b in self._alive()}:
                return True
            time.sleep(1.0)
        return False

    def _remove(self, box: str, alive: bool) -> tuple[str, Any]:
        if alive:
            self._drain(box, True)
            task = self._ray.remote(stop_agent)
            ref = task.options(resources={f"box:{box}": 0.001}, num_cpus=0).remote()
            try:
                # Generous: on a busy box the task waits for a Ray worker to start.
                said = self._ray.get(ref, timeout=REMOVE_TIMEOUT_S)
            except Exception as exc:
                # A leaving agent stops its box's Ray node, which can take the
                # reply with it: the box leaving is the answer that counts.
                if not self._gone(box, REMOVE_TIMEOUT_S):
                    raise
                said = f"its agent left (the reply was lost with its node: {type(exc).__name__})"
        else:
            said = "forgotten"
        doc = self._records()
        doc.forgotten[box] = time.time()
        doc.drained = sorted(set(doc.drained) - {box})
        for n, record in doc.models.items():
            doc.models[n] = replace(
                record, profiles=tuple(p for p in record.profiles if p.id != box)
            )
        self._save(doc)
        msg = f"removed {box}: {said}"
        self.events.add("remove", msg, box=box)
        return msg, None
