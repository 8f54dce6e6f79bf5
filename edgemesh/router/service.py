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

from edgemesh.engine import Engine, EngineConfig
from edgemesh.gateway.service import ModelService
from edgemesh.mesh.deployment_record import DeploymentRecord, PackageRef, StageInfo
from edgemesh.pipeline import LocalPipeline
from edgemesh.router.artifacts import Source, default_cache_root, ensure_artifacts, source_reader
from edgemesh.router.placement import PlanPlacer
from edgemesh.router.stage import StageSpec

if TYPE_CHECKING:
    from edgemesh.router.ray_pipeline import RayPipeline
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
) -> tuple[LocalPipeline | RayPipeline, list[StageInfo]]:
    """The pipeline for ``placer``'s stages and a description of where they run."""
    specs = placer.initial()
    if (len(specs) == 1 and specs[0].box == here) or not ray_running():
        log.info("'%s': single-box path, in process", placer.manifest.name)
        return in_process_pipeline(package, specs, here=here)
    from edgemesh.router.ray_pipeline import RayPipeline

    pipe = RayPipeline(placer, ref, source=source)
    return pipe, pipe.stages()


def mesh_service(
    record: DeploymentRecord,
    *,
    here: str | None,
    source: Source | None,
    max_sequences: int | None = None,
    max_queue: int = 64,
    on_change: OnChange | None = None,
) -> ModelService:
    """Open one deployed model (a record written by ``edgemesh deploy``).

    The KV cache is what the plan reserved on each box: ``plan.sequences``
    sequences of ``plan.context`` tokens. The engine admits that many (more
    wait in its queue, then 429) and every stage refuses more, so a box never
    holds more cache than its plan priced in. ``max_sequences`` may only
    lower it.

    ``on_change(name, stages, plan)`` is called after the stages moved (a
    loss or a join), from the pipeline's recovery thread."""
    from edgemesh.sharding.package.folder import Package

    ref = record.package
    manifest = ref.manifest
    package = local_package(ref, here or "local", source)
    plan = record.plan
    context = min(plan.context, manifest.context_length)
    slots = min(max_sequences or plan.sequences, plan.sequences)
    placer = PlanPlacer(
        manifest,
        plan,
        record.profiles,
        record.links,
        package_dir=ref.path,
        origin_box=ref.origin_box,
        stage_defaults={
            "max_sequences": slots,
            "context_length": context,
            "threads": record.extra.get("threads"),
        },
    )
    pipe, where = build_pipeline(placer, ref, here=here, package=package, source=source)
    # The manifest is the record's, parsed once: no second read of manifest.json.
    tokenizer = Package(package, manifest).tokenizer()
    engine = Engine(
        pipe,
        tokenizer,
        EngineConfig(context_length=context, max_sequences=slots, max_queue=max_queue),
    )
    info: dict[str, Any] = {
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
    return ModelService(name=record.name, engine=engine, tokenizer=tokenizer, info=info)
