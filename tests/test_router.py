"""The router on a local Ray node: stage actors pinned by box resources.

One Ray node is started for the module with the custom resources
``box:a``, ``box:b`` and ``box:c`` (what ``edgemesh join`` gives each box's
node), so every stage actor is a real Ray actor in its own worker process,
pinned the way it is on a mesh. The tiny Qwen3 package (3 layers) is cut
into 1, 2 and 3 stages and compared token for token with the single-box
``LocalPipeline``.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgemesh.engine import Engine, EngineConfig
from edgemesh.errors import CorruptArtifactError, ModelUnavailableError
from edgemesh.mesh.deployment_record import PackageRef
from edgemesh.router.artifacts import ArtifactSource, ensure_artifacts
from edgemesh.router.placement import PlanPlacer, StaticPlacer
from edgemesh.router.stage import StageSpec, wire_dtype
from edgemesh.sampling import SamplingParams
from tests.fixtures.tiny_models import shared_tiny_package

pytest.importorskip("onnxruntime")

NUM_LAYERS = 3  # tiny qwen3
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package("qwen3")


@pytest.fixture(scope="module")
def ray_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    ray = pytest.importorskip("ray")
    temp = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=2,
        resources={"box:a": 1.0, "box:b": 1.0, "box:c": 1.0},
        include_dashboard=False,
        _temp_dir=str(temp),
        logging_level="warning",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _specs(package: Path, cuts: list[int], tmp: Path, precision: str = "fp32") -> list[StageSpec]:
    points = [0, *cuts, NUM_LAYERS]
    boxes = "abc"
    return [
        StageSpec(
            index=i,
            box=boxes[i],
            start=a,
            stop=b,
            num_layers=NUM_LAYERS,
            precision=precision,
            package_dir=str(package),
            cache_root=str(tmp / f"cache-{boxes[i]}"),
            max_sequences=16,  # what _engine admits: each stage holds that many KV slots
        )
        for i, (a, b) in enumerate(itertools.pairwise(points))
    ]


def _prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[1, *rng.integers(5, 300, size=int(rng.integers(3, 12))).tolist()] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(package: Path) -> dict[int, list[int]]:
    """Greedy tokens of every prompt from the single-box in-process pipeline."""
    from edgemesh.offline import generate
    from edgemesh.sharding.pipeline import load_pipeline

    pipe = load_pipeline(package)
    try:
        return {
            i: generate(pipe, p, max_tokens=MAX_TOKENS).token_ids
            for i, p in enumerate(_prompts(16))
        }
    finally:
        pipe.close()


def _engine(pipeline: object, package: Path) -> Engine:
    from edgemesh.sharding.package.folder import open_package

    tok = open_package(package).tokenizer()
    return Engine(pipeline, tok, EngineConfig(context_length=256, max_sequences=16, max_queue=64))


def _run_all(engine: Engine, prompts: list[list[int]], kill=None) -> dict[int, list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    gens = {i: engine.submit(p, params) for i, p in enumerate(prompts)}
    out: dict[int, list[int]] = {}
    for i, gen in gens.items():
        events = []
        for ev in gen:
            events.append(ev)
            if kill is not None and i == 0 and len(events) == 6:
                kill()
        assert events[-1].finish_reason == "length", events[-1]
        out[i] = [e.token_id for e in events if e.token_id is not None]
    return out


def test_wire_dtype_keeps_fp32_pipelines_exact() -> None:
    assert wire_dtype("fp32", "fp32") == "float32"
    assert wire_dtype("fp16", "fp32") == "float32"
    assert wire_dtype("fp16", "int8") == "float16"


def test_artifacts_are_fetched_verified_and_cached(package: Path, tmp_path: Path) -> None:
    source = ArtifactSource(str(package))
    manifest = source.manifest()
    ref = PackageRef.from_bytes(manifest)
    needed = ["fp32/layer_001.onnx", "fp32/layer_001.onnx.data"]
    reads: list[str] = []

    def read(rel: str, offset: int, size: int) -> bytes:
        reads.append(rel)
        return source.read(rel, offset, size)

    folder = ensure_artifacts(ref, needed, tmp_path / "cache", read)
    assert (folder / "manifest.json").read_bytes() == manifest
    for rel in needed:
        assert (folder / rel).read_bytes() == (package / rel).read_bytes()
    reads.clear()
    assert ensure_artifacts(ref, needed, tmp_path / "cache", read) == folder
    assert reads == []  # a verified cache is not fetched again

    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    data = bytearray((bad / needed[1]).read_bytes())
    data[100] ^= 0xFF
    (bad / needed[1]).write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"layer_001\.onnx\.data"):
        ensure_artifacts(ref, needed, tmp_path / "other", ArtifactSource(str(bad)).read)
    assert not list((tmp_path / "other").rglob("layer_001.onnx.data"))
    with pytest.raises(Exception, match="not an artifact"):
        source.read("../../etc/passwd", 0, 10)


def test_no_room_after_a_loss_is_a_503(package: Path) -> None:
    from edgemesh.gateway.errors import edgemesh_response
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.plan import plan

    manifest = Manifest.load(package)
    compute = {
        f"onnxruntime/{p}": {"gflops": 10.0, "bandwidth_gbps": 5.0} for p in ("fp32", "fp16")
    }
    fp16 = sum(
        c.weight_bytes["fp16"] for c in [*manifest.layers, manifest.embedding, manifest.head]
    )
    # Together the two boxes hold the model at fp16 (int8/int4 are over the
    # accuracy budget of 0); either box alone cannot.
    boxes = [
        {
            "id": b,
            "memory_limit_bytes": int(fp16 * 0.75),
            "backends": ["onnxruntime"],
            "compute": compute,
        }
        for b in ("a", "b")
    ]
    options = PlanOptions(
        context=64, sequences=1, headroom=0.0, runtime_overhead_bytes=0, max_accuracy_loss=0.0
    )
    placed = plan(manifest, boxes, None, options)
    placer = PlanPlacer(manifest, placed, boxes, package_dir=str(package))
    assert {s.box for s in placer.initial()} == {"a", "b"}
    with pytest.raises(ModelUnavailableError, match="cannot hold") as err:
        placer.after_loss({"a"})
    response = edgemesh_response(err.value)
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["code"] == "model_unavailable"
    with pytest.raises(ModelUnavailableError):
        StaticPlacer(_specs(package, [1], Path("/tmp"))).after_loss({"a"})


@pytest.mark.slow
@pytest.mark.parametrize("cuts", [[], [1], [1, 2]], ids=["1-stage", "2-stage", "3-stage"])
def test_ray_pipeline_is_token_identical_with_16_streams(
    ray_node, package: Path, reference: dict[int, list[int]], cuts: list[int], tmp_path: Path
) -> None:
    from edgemesh.router.ray_pipeline import RayPipeline

    specs = _specs(package, cuts, tmp_path)
    pipe = RayPipeline(StaticPlacer(specs), PackageRef.from_folder(package))
    engine = _engine(pipe, package)
    try:
        assert pipe.depth == len(specs)
        assert [d["box"] for d in pipe.describe()] == [s.box for s in specs]
        assert _run_all(engine, _prompts(16)) == reference
        stats = pipe.stage_stats()
        assert len(stats) == len(specs) and all(s["calls"] > 0 for s in stats)
    finally:
        engine.close()


@pytest.mark.slow
def test_a_killed_stage_is_rebuilt_by_replay_without_losing_tokens(
    ray_node, package: Path, reference: dict[int, list[int]], tmp_path: Path
) -> None:
    """Kill the middle stage mid-stream; it is restarted, every live sequence's
    KV is rebuilt by replay, and the outputs equal the undisturbed ones. The
    middle stage's box has no copy of the package, so it fetches its
    artifacts from the source actor (verified by sha256)."""
    from edgemesh.router.ray_pipeline import RayPipeline

    ray = ray_node
    specs = _specs(package, [1, 2], tmp_path)
    specs[1] = StageSpec(**{**specs[1].to_dict(), "package_dir": ""})
    source = ray.remote(ArtifactSource).options(resources={"box:a": 0.001}).remote(str(package))
    pipe = RayPipeline(StaticPlacer(specs), PackageRef.from_folder(package), source=source)
    engine = _engine(pipe, package)
    try:
        first = pipe.describe()[1]
        assert first["fetched"] and first["package_dir"].startswith(str(tmp_path / "cache-b"))
        victim = pipe._actors[1]
        out = _run_all(engine, _prompts(8), kill=lambda: ray.kill(victim, no_restart=True))
        assert out == {i: reference[i] for i in range(8)}
        assert pipe.recoveries == 1 and pipe.replayed_tokens > 0
        assert pipe.describe()[1]["pid"] != first["pid"]
    finally:
        engine.close()
        ray.kill(source)


@pytest.mark.slow
def test_deploy_serves_the_openai_api_through_ray_serve(
    ray_node, package: Path, tmp_path: Path
) -> None:
    """`deploy` plans over the box resources, mirrors the package on the head,
    and Ray Serve answers the same OpenAI API as a single box, token for token."""
    import httpx

    from edgemesh.offline import generate
    from edgemesh.router.deploy import NAMESPACE, SOURCE_PREFIX, deploy, status_extras
    from edgemesh.sharding.package.folder import open_package
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.pipeline import load_pipeline
    from edgemesh.sharding.planner.costs import PlanOptions
    from tests.conftest import free_port

    ray = ray_node
    manifest = Manifest.load(package)
    # Room for the embedding or the head with one layer, not two layers: 3 stages.
    limit = manifest.layers[0].weight_bytes["fp32"] + manifest.head.weight_bytes["fp32"] + 90_000
    compute = {"onnxruntime/fp32": {"gflops": 10.0, "bandwidth_gbps": 5.0}}
    boxes = [
        {"id": b, "memory_limit_bytes": limit, "backends": ["onnxruntime"], "compute": compute}
        for b in "abc"
    ]
    options = PlanOptions(context=64, sequences=2, headroom=0.0, runtime_overhead_bytes=0)
    from edgemesh.router.serve import stop_gateway

    try:
        record = deploy(
            package,
            name="tiny",
            here="a",
            profiles=boxes,
            port=free_port(),
            state_dir=tmp_path,
            plan_options=options,
        )
        stages = [s.to_dict() for s in record.stages]
        assert len(stages) >= 2 and {s["precision"] for s in stages} == {"fp32"}
        assert status_extras(tmp_path)["models"]["tiny"]["stages"] == stages
        # What the head's GCS holds reads back as the same typed record.
        from edgemesh.mesh import deployments

        assert deployments.load(ray).models["tiny"] == record
        prompt = _prompts(1)[0]
        pipe = load_pipeline(package, [s["layers"][0] for s in stages[1:]])
        try:
            want = generate(pipe, prompt, max_tokens=MAX_TOKENS, eos_ids=[2]).token_ids
        finally:
            pipe.close()
        assert record.gateway is not None
        with httpx.Client(base_url=record.gateway, timeout=120) as client:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            got = client.post("/completions", json=body)
            assert got.status_code == 200, got.text
            assert got.json()["usage"]["completion_tokens"] == len(want)
            tok = open_package(package).tokenizer()
            assert got.json()["choices"][0]["text"] == tok.decode(
                [t for t in want if t not in tok.eos_ids]
            )
            metrics = client.get(record.gateway.removesuffix("/v1") + "/metrics/json").json()
            ran = [s["box"] for s in metrics["tiny"]["info"]["stages"]]
            assert ran == [s["box"] for s in stages]
    finally:
        try:
            stop_gateway()
        finally:
            for suffix in ("", "-origin"):
                try:
                    ray.kill(ray.get_actor(f"{SOURCE_PREFIX}tiny{suffix}", namespace=NAMESPACE))
                except ValueError:
                    pass
            from ray import serve

            serve.shutdown()


def test_a_joining_box_is_used_only_when_the_plan_improves_by_the_margin(package: Path) -> None:
    """After a loss the model is squeezed onto two boxes; when the third comes
    back the placer moves to three stages, because the bottleneck improves by
    more than the margin. An unchanged mesh, or a gain under the margin, stays."""
    from edgemesh.router.placement import REPLAN_MARGIN
    from edgemesh.sharding.package.manifest import Manifest
    from edgemesh.sharding.planner.costs import PlanOptions
    from edgemesh.sharding.planner.plan import plan

    manifest = Manifest.load(package)
    # Slow compute, ample memory: one layer per box is the fastest placement.
    compute = {"onnxruntime/fp32": {"gflops": 0.01, "bandwidth_gbps": 0.5}}
    boxes = [
        {"id": b, "memory_limit_bytes": 1 << 30, "backends": ["onnxruntime"], "compute": compute}
        for b in "abc"
    ]
    options = PlanOptions(context=256, sequences=16, headroom=0.0, runtime_overhead_bytes=0)
    placer = PlanPlacer(manifest, plan(manifest, boxes, None, options), boxes)
    assert sorted(s.box for s in placer.initial()) == ["a", "b", "c"]
    assert placer.after_join({"a", "b", "c"}) is None  # nothing new

    squeezed = placer.after_loss({"a", "b"})
    assert len(squeezed) == 2 and {s.box for s in squeezed} == {"a", "b"}
    before = placer.plan.bottleneck_ms
    back = placer.after_join({"a", "b", "c"})
    assert back is not None and sorted(s.box for s in back) == ["a", "b", "c"]
    assert placer.plan.bottleneck_ms <= before * (1 - REPLAN_MARGIN)
    assert placer.after_join({"a", "b", "c"}) is None  # already there: no churn

    placer.after_loss({"a", "b"})
    placer.margin = 0.99  # a gain the placer will not pay a pause for
    assert placer.after_join({"a", "b", "c"}) is None
    assert len(placer.plan.stages) == 2

    # A deploy whose plan leaves out a box it profiled: that box, seen alive
    # in the next poll, is no join and must not pull the model onto itself.
    left_out = PlanPlacer(manifest, plan(manifest, boxes[:2], None, options), boxes)
    assert left_out.after_join({"a", "b", "c"}) is None


def test_hidden_states_beyond_fp16_range_travel_at_fp32() -> None:
    from edgemesh.router.stage import to_wire

    small = np.array([[1.5, -2.0]], np.float32)
    assert to_wire(small, np.dtype(np.float16)).dtype == np.float16
    big = np.array([[82_500.0, 1.0]], np.float32)  # Gemma 3's residual stream does this
    sent = to_wire(big, np.dtype(np.float16))
    assert sent.dtype == np.float32 and np.isfinite(sent).all() and sent[0, 0] == 82_500.0


def test_batches_from_the_object_store_reach_backends_writeable() -> None:
    from edgemesh.router.stage import Batch

    data = np.zeros((3, 4), np.float32)
    data.flags.writeable = False  # as Ray hands arrays over
    batch = Batch([1, 2], [0, 5], [2, 1], ["last", "last"], data)
    inputs = batch.inputs(first=False)
    assert [i.hidden.shape for i in inputs] == [(2, 4), (1, 4)]
    assert all(i.hidden.flags.writeable for i in inputs)
