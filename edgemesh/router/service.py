"""A deployed model as a gateway ``ModelService``: the pipeline, engine and tokenizer.

``build_pipeline`` picks the data path: when the plan has one stage on the
box the gateway runs on, or Ray is not running, the backend runs in this
process (``LocalPipeline``) and no request leaves the box; otherwise a
``RayPipeline`` over stage actors on the mesh.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgemesh.engine import Engine, EngineConfig
from edgemesh.gateway.service import ModelService
from edgemesh.pipeline import LocalPipeline
from edgemesh.router.artifacts import default_cache_root, ensure_artifacts, source_reader
from edgemesh.router.placement import PlanPlacer
from edgemesh.router.stage import StageSpec

log = logging.getLogger(__name__)


def ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return bool(ray.is_initialized())


def local_package(record: dict[str, Any], manifest_bytes: bytes, box: str, source: Any) -> Path:
    """A folder on this box with the whole package (its own copy, or fetched)."""
    from edgemesh.router.artifacts import local_copy_ok
    from edgemesh.sharding.package.manifest import Manifest

    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    everything = [a.path for a in manifest.artifacts]
    hint = Path(record.get("package_dir", ""))
    mine = record.get("origin_box") in (None, box)  # the path means something only there
    if mine and record.get("package_dir") and local_copy_ok(hint, manifest_bytes, everything):
        return hint
    return ensure_artifacts(
        manifest_bytes, everything, default_cache_root(box), source_reader(source)
    )


def in_process_pipeline(
    package: Path, specs: Sequence[StageSpec], *, here: str | None = None
) -> tuple[LocalPipeline, list[dict[str, Any]]]:
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
        {
            "box": here or "local",
            "layers": [s.start, s.stop],
            "backend": s.backend,
            "precision": s.precision,
            "in_process": True,
        }
        for s in specs
    ]
    return pipe, where


def build_pipeline(
    placer: PlanPlacer, manifest_bytes: bytes, *, here: str | None, package: Path, source: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The pipeline for ``placer``'s stages and a description of where they run."""
    specs = placer.initial()
    if (len(specs) == 1 and specs[0].box == here) or not ray_running():
        log.info("'%s': single-box path, in process", placer.manifest.name)
        return in_process_pipeline(package, specs, here=here)
    from edgemesh.router.ray_pipeline import RayPipeline

    pipe = RayPipeline(placer, manifest_bytes, source=source)
    return pipe, pipe.describe()


def mesh_service(
    record: dict[str, Any],
    *,
    here: str | None,
    source: Any,
    max_sequences: int | None = None,
    max_queue: int = 64,
    on_change: Callable[[str, list[dict[str, Any]], dict[str, Any]], None] | None = None,
) -> ModelService:
    """Open one deployed model (a record written by ``edgemesh deploy``).

    The KV cache is what the plan reserved on each box: ``plan.sequences``
    sequences of ``plan.context`` tokens. The engine admits that many (more
    wait in its queue, then 429) and every stage refuses more, so a box never
    holds more cache than its plan priced in. ``max_sequences`` may only
    lower it.

    ``on_change(name, stages, plan)`` is called after the stages moved (a
    loss or a join), from the pipeline's recovery thread."""
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.planner.plan import Plan

    manifest_bytes = record["manifest"].encode()
    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    package = local_package(record, manifest_bytes, here or "local", source)
    plan = Plan.from_dict(record["plan"])
    context = min(plan.context, manifest.context_length)
    slots = min(max_sequences or plan.sequences, plan.sequences)
    placer = PlanPlacer(
        manifest,
        plan,
        record.get("profiles", []),
        record.get("links", []),
        package_dir=record.get("package_dir", ""),
        origin_box=record.get("origin_box"),
        stage_defaults={
            "max_sequences": slots,
            "context_length": context,
            "threads": record.get("threads"),
        },
    )
    pipe, where = build_pipeline(placer, manifest_bytes, here=here, package=package, source=source)
    tokenizer = open_package(package).tokenizer()
    engine = Engine(
        pipe,
        tokenizer,
        EngineConfig(context_length=context, max_sequences=slots, max_queue=max_queue),
    )
    info: dict[str, Any] = {
        "backend": "mesh",
        "stages": where,
        "plan": {"bottleneck_ms": plan.bottleneck_ms},
        "recoveries": 0,
        "replans": 0,
    }
    if hasattr(pipe, "on_change"):

        def changed(stages: list[dict[str, Any]]) -> None:
            info.update(stages=stages, recoveries=pipe.recoveries, replans=pipe.replans)
            info["plan"] = {"bottleneck_ms": placer.plan.bottleneck_ms}
            if on_change is not None:
                try:
                    on_change(record["name"], stages, placer.plan.to_dict())
                except Exception as exc:  # the record is a mirror: serving goes on
                    log.warning("could not update the deployment record: %r", exc)

        pipe.on_change = changed
    return ModelService(name=record["name"], engine=engine, tokenizer=tokenizer, info=info)
