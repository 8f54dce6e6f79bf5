"""A deployed model as a gateway ``ModelService``: the pipeline, engine and tokenizer.

``build_pipeline`` picks the data path: when the plan has one stage on the
box the gateway runs on, or Ray is not running, the backend runs in this
process (``LocalPipeline``) and no request leaves the box; otherwise a
``RayPipeline`` over stage actors on the mesh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgemesh.engine import Engine, EngineConfig
from edgemesh.gateway.service import ModelService
from edgemesh.router.artifacts import default_cache_root, ensure_artifacts, source_reader
from edgemesh.router.placement import PlanPlacer

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
    from edgemesh.sharding.manifest import Manifest

    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    everything = [a.path for a in manifest.artifacts]
    hint = Path(record.get("package_dir", ""))
    if record.get("package_dir") and local_copy_ok(hint, manifest_bytes, everything):
        return hint
    return ensure_artifacts(
        manifest_bytes, everything, default_cache_root(box), source_reader(source)
    )


def build_pipeline(
    placer: PlanPlacer, manifest_bytes: bytes, *, here: str | None, package: Path, source: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The pipeline for ``placer``'s stages and a description of where they run."""
    specs = placer.initial()
    if (len(specs) == 1 and specs[0].box == here) or not ray_running():
        from edgemesh.backends.base import BackendOptions
        from edgemesh.sharding.pipeline import load_pipeline

        cuts = [s.start for s in specs[1:]]
        pipe = load_pipeline(
            package,
            cuts,
            [s.precision for s in specs],
            backend=specs[0].backend,
            options=BackendOptions(threads=specs[0].threads, max_sequences=specs[0].max_sequences),
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
        log.info("'%s': single-box path, in process", placer.manifest.name)
        return pipe, where
    from edgemesh.router.ray_pipeline import RayPipeline

    pipe = RayPipeline(placer, manifest_bytes, source=source)
    return pipe, pipe.describe()


def mesh_service(
    record: dict[str, Any],
    *,
    here: str | None,
    source: Any,
    max_sequences: int = 16,
    max_queue: int = 64,
) -> ModelService:
    """Open one deployed model (a record written by ``edgemesh deploy``)."""
    from edgemesh.sharding.manifest import Manifest
    from edgemesh.sharding.package import open_package
    from edgemesh.sharding.planner import Plan

    manifest_bytes = record["manifest"].encode()
    manifest = Manifest.from_dict(json.loads(manifest_bytes))
    package = local_package(record, manifest_bytes, here or "local", source)
    plan = Plan.from_dict(record["plan"])
    placer = PlanPlacer(
        manifest,
        plan,
        record.get("profiles", []),
        record.get("links", []),
        package_dir=record.get("package_dir", ""),
        stage_defaults={"max_sequences": max_sequences * 2, "threads": record.get("threads")},
    )
    pipe, where = build_pipeline(placer, manifest_bytes, here=here, package=package, source=source)
    tokenizer = open_package(package).tokenizer()
    context = min(plan.context, manifest.context_length)
    engine = Engine(
        pipe,
        tokenizer,
        EngineConfig(context_length=context, max_sequences=max_sequences, max_queue=max_queue),
    )
    info = {"backend": "mesh", "stages": where, "plan": {"bottleneck_ms": plan.bottleneck_ms}}
    if hasattr(pipe, "on_change"):
        pipe.on_change = lambda stages: info.__setitem__("stages", stages)
    return ModelService(name=record["name"], engine=engine, tokenizer=tokenizer, info=info)
