"""A drained box stays drained: the placer that re-plans a served model on
joins and losses (``PlanPlacer``, what the mesh gateway's membership watcher
and recovery call) never puts a stage back on a box the dashboard drained,
however often that box is seen alive, until it is undrained. And a plan
applied from the page (``adopt``) becomes the current one without counting
as a join.

The mesh version, with real boxes and the live move, is
``tests/test_manage_netns.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgemesh.router.placement import PlanPlacer
from tests.fixtures.tiny_models import shared_tiny_package

# Slow compute, ample memory: one layer per box is the fastest placement,
# so a box left alive but out of the plan is one the placer skipped on purpose.
COMPUTE = {"onnxruntime/fp32": {"gflops": 0.01, "bandwidth_gbps": 0.5}}


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package("llama")


def _placer(package: Path, ids: str) -> tuple[PlanPlacer, Any, list[dict[str, Any]], Any]:
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.plan import plan

    manifest = Manifest.load(package)
    boxes = [
        {"id": b, "memory_limit_bytes": 1 << 30, "backends": ["onnxruntime"], "compute": COMPUTE}
        for b in ids
    ]
    options = PlanOptions(context=256, sequences=16, headroom=0.0, runtime_overhead_bytes=0)
    placer = PlanPlacer(manifest, plan(manifest, boxes, None, options), boxes)
    return placer, manifest, boxes, options


def test_a_drained_box_is_left_out_of_replans_after_joins_and_losses(package: Path) -> None:
    placer, manifest, boxes, options = _placer(package, "abc")
    assert sorted(s.box for s in placer.initial()) == ["a", "b", "c"]

    # Drained: the page re-plans without it (what MeshManager._move_off applies).
    from edgemesh.sharding.planner.plan import plan

    placer.exclude({"c"})
    off = plan(manifest, [b for b in boxes if b["id"] != "c"], None, options)
    specs = placer.adopt(off)
    assert {s.box for s in specs} == {"a", "b"}
    # c keeps announcing: every watcher round sees it alive; none pulls the model back.
    for _ in range(3):
        assert placer.after_join({"a", "b", "c"}) is None
    # b is lost: the re-plan squeezes onto a alone, not onto the drained c.
    squeezed = placer.after_loss({"a", "c"})
    assert {s.box for s in squeezed} == {"a"}
    # b comes back: a join re-plan may use b again, still never c.
    back = placer.after_join({"a", "b", "c"})
    assert back is not None and {s.box for s in back} == {"a", "b"}

    # Undrained: the next round over the same alive boxes now finds c and uses it.
    placer.exclude(set())
    again = placer.after_join({"a", "b", "c"})
    assert again is not None and sorted(s.box for s in again) == ["a", "b", "c"]


def test_only_drained_boxes_left_is_unavailable_not_a_plan_on_them(package: Path) -> None:
    from edgemesh.errors import ModelUnavailableError

    placer, *_ = _placer(package, "ab")
    placer.exclude({"b"})
    with pytest.raises(ModelUnavailableError, match="no box of the mesh is left"):
        placer.after_loss({"b"})  # a is lost; b alive but drained
