"""A deployed model as a gateway ``ModelService``: the pipeline, engine and tokenizer.

``build_pipeline`` picks the data path: when the plan has one stage on the
box the gateway runs on, or Ray is not running, the backend runs in this
process (``LocalPipeline``) and no request leaves the box; otherwise a
``RayPipeline`` over stage actors on the mesh.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemesh.gateway.service import ModelService, serve_pipeline
from edgemesh.limits import DEFAULT_LIMITS, ServingLimits
from edgemesh.mesh.deployment_record import DeploymentRecord, JSONObject, PackageRef, StageInfo
from edgemesh.pipeline import LocalPipeline
from edgemesh.router.artifacts import Source, default_cache_root, ensure_artifacts, source_reader
from edgemesh.router.placement import PlanPlacer
from edgemesh.router.stage import StageSpec

if TYPE_CHECKING:
    from edgemesh.router.ray_pipeline import RayPipeline
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.plan import Plan

OnChange = Callable[[str, list[StageInfo], "Plan"], None]
"""``on_change(model, stages, plan)``: the stages of ``model`` moved (a loss, a join)."""

log = logging.getLogger(__name__)


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def local_package(package: PackageRef, box: str, source: Source | None) -> Path:
    """A folder on this box with the whole package (its own copy, or fetched)."""
    from edgemesh.errors import ModelNotFoundError
    from edgemesh.router.artifacts import local_copy_ok

    everything = package.all_files()
    hint = package.path_on(box)  # the path means something only on the origin box
    if hint and local_copy_ok(Path(hint), package, everything):
        return Path(hint)
    if source is None:
        raise ModelNotFoundError(
            f"box '{box}' has no intact copy of '{package.name}' and no artifact source was given"
        )
    return ensure_artifacts(package, everything, default_cache_root(box), source_reader(source))


def in_process_pipeline(
    package: Path, specs: Sequence[StageSpec], *, here: str | None = None
) -> tuple[LocalPipeline, list[StageInfo]]:
    """The stages' backends chained in this process (``LocalPipeline``): the
    single-box path of the gateway and of ``edgemesh serve PACKAGE``. All
    stages use the first stage's backend, threads and sequence budget."""
    from edgemesh.backends.base import BackendOptions
    from edgemesh.sharding.pipeline import load_pipeline

    first = specs[0]
    pipe = load_pipeline(
        package,
        [s.start for s in specs[1:]],
        [s.precision for s in specs],
        backend=first.backend,
        options=BackendOptions(
            threads=first.threads,
            context_length=first.context_length,
            max_sequences=first.max_sequences,
        ),
    )
    where = [
        StageInfo(here or "local", s.start, s.stop, s.backend, s.precision, in_process=True)
        for s in specs
    ]
    return pipe, where


def build_pipeline(
    placer: PlanPlacer,
    ref: PackageRef,
    *,
    here: str | None,
    package: Path,
    source: Source | None,
    limits: ServingLimits = DEFAULT_LIMITS,
) -> tuple[LocalPipeline | RayPipeline, list[StageInfo]]:
    """The pipeline for ``placer``'s stages and a description of where they run
    (``limits.prefill_chunk``: how a replay after a lost box re-feeds prompts)."""
    specs = placer.initial()
    if (len(specs) == 1 and specs[0].box == here) or not ray_running():
        log.info("'%s': single-box path, in process", placer.manifest.name)
        return in_process_pipeline(package, specs, here=here)
    from edgemesh.router.ray_pipeline import RayPipeline

    pipe = RayPipeline(placer, ref, source=source, prefill_chunk=limits.prefill_chunk)
    return pipe, pipe.stages()


def record_limits(record: DeploymentRecord) -> ServingLimits:
    """The serving limits a deployment record carries (``limits``; a record
    without them gets the defaults)."""
    return record.limits if record.limits is not None else DEFAULT_LIMITS


def plan_limits(limits: ServingLimits, plan: Plan, manifest: Manifest) -> ServingLimits:
    """``limits`` under a plan: the context and sequence slots are the plan's
    (the KV cache it priced on every box; the model's context at most), the
    rest (queue, prefill, threads, default max_tokens) is ``limits``'."""
    return limits.replace(
        context_length=min(plan.context, manifest.context_length),
        max_sequences=plan.sequences,
    )


def mesh_service(
    record: DeploymentRecord,
    *,
    here: str | None,
    source: Source | None,
    limits: ServingLimits | None = None,
    on_change: OnChange | None = None,
) -> ModelService:
    """Open one deployed model (a record written by ``edgemesh deploy``).

    The KV cache is what the plan reserved on each box: ``plan.sequences``
    sequences of ``plan.context`` tokens. The engine admits that many (more
    wait in its queue, then 429) and every stage refuses more, so a box never
    holds more cache than its plan priced in. The other limits come from
    ``limits``, else the record's (``record_limits``).

    ``on_change(name, stages, plan)`` is called after the stages moved (a
    loss or a join), from the pipeline's recovery thread."""
    from edgemesh.sharding.package.folder import Package

    ref = record.package
    manifest = ref.manifest
    package = local_package(ref, here or "local", source)
    plan = record.plan
    limits = plan_limits(limits or record_limits(record), plan, manifest)
    placer = PlanPlacer(
        manifest,
        plan,
        record.profiles,
        record.links,
        package_dir=ref.path,
        origin_box=ref.origin_box,
        stage_defaults={
            "max_sequences": limits.max_sequences,
            "context_length": limits.context_length,
            "threads": limits.threads,
        },
    )
    pipe, where = build_pipeline(
        placer, ref, here=here, package=package, source=source, limits=limits
    )
    # The manifest is the record's, parsed once: no second read of manifest.json.
    tokenizer = Package(package, manifest).tokenizer()
    info: JSONObject = {
        "backend": "mesh",
        "stages": [s.to_dict() for s in where],
        "plan": {"bottleneck_ms": plan.bottleneck_ms},
        "recoveries": 0,
        "replans": 0,
    }
    from edgemesh.router.ray_pipeline import RayPipeline

    if isinstance(pipe, RayPipeline):
        mesh_pipe = pipe

        def changed(stages: list[StageInfo]) -> None:
            info.update(
                stages=[s.to_dict() for s in stages],
                recoveries=mesh_pipe.recoveries,
                replans=mesh_pipe.replans,
            )
            info["plan"] = {"bottleneck_ms": placer.plan.bottleneck_ms}
            if on_change is not None:
                try:
                    on_change(record.name, stages, placer.plan)
                except Exception as exc:  # the record is a mirror: serving goes on
                    log.warning("could not update the deployment record: %r", exc)

        mesh_pipe.on_change = changed
    from edgemesh.gateway.embeddings import pooled_embedder

    def embedder() -> Any:
        # Through the mesh the last stage pools (it holds the final norm); on the
        # head's own process the pipeline's last backend says whether it can.
        if isinstance(pipe, RayPipeline):
            return pooled_embedder(pipe.pooled, manifest.hidden_size, limits.context_length)
        can = getattr(pipe.backends[-1], "can_pool", False)
        return pooled_embedder(pipe.forward, manifest.hidden_size, limits.context_length, can)

    return serve_pipeline(
        record.name, pipe, tokenizer, limits, info=info, embedder_factory=embedder
    )
