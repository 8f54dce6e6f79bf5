"""Graph replicas as Ray actors on a one-node Ray cluster that has two box resources.

What `edgemesh deploy` of a graph package does on each box, without namespaces
(tests/test_graph_deploy_netns.py runs the whole CLI story on a real mesh):
a replica per box, the package fetched from the source box and checked by
sha256, the gateway's ReplicaSet over the actors, a killed replica retried
elsewhere, and a corrupt source refused with the file named.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("torch", reason="needs torch to build the test model (edgemesh[import-torch])")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (edgemesh[onnx])")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from edgemesh.graph.build import build_package
    from edgemesh.paths import CACHE_ENV

    tmp = tmp_path_factory.mktemp("graph-deploy")
    package = tmp / "cls"
    build_package("tests.graph_models:classifier", package)
    # The boxes' caches under tmp (Ray's workers inherit the environment at init).
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp / "cache")
    # A short folder: Ray's socket paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="emgd-")
    ray.init(
        num_cpus=2,
        resources={"box:a": 1.0, "box:b": 1.0, "box:c": 1.0},
        include_dashboard=False,
        _temp_dir=ray_tmp,
        logging_level="warning",
    )
    try:
        yield package
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old


def _source(box: str, folder: Path):
    from edgemesh.router.graph_replica import GraphSource

    return ray.remote(GraphSource).options(resources={f"box:{box}": 0.001}).remote(str(folder))


def test_replicas_serve_through_the_replica_set_and_a_killed_one_is_retried(
    cluster: Path,
) -> None:
    from edgemesh.graph.manifest import MANIFEST
    from edgemesh.graph.service import GraphServeOptions, load_graph_service
    from edgemesh.router.graph_place import GraphDeployOptions, place_replicas, remove_replicas
    from edgemesh.router.graph_replica import cache_folder, intact_copy, open_graph_sets

    raw = (cluster / MANIFEST).read_bytes()
    source = _source("a", cluster)
    try:
        placed = place_replicas(
            ray, "cls", raw, ["a", "b"], source=source, origin_box="a",
            package_dir=str(cluster), options=GraphDeployOptions(replicas=2, threads=1),
        )  # fmt: skip
    finally:
        ray.kill(source)
    by_box = {r["box"]: r for r in placed.replicas}
    assert sorted(by_box) == ["a", "b"] and placed.refused == {}
    assert by_box["a"]["fetched"] is False and by_box["b"]["fetched"] is True
    assert intact_copy(cache_folder("b", raw), raw)
    record = {"manifest": raw.decode(), "replicas": placed.replicas}
    (graphs,) = open_graph_sets(ray, {"cls": record})
    chosen = by_box["b"]
    local = load_graph_service(
        cluster, GraphServeOptions(backend=chosen["backend"], precision=chosen["precision"])
    )
    rng = np.random.default_rng(1)

    async def ask(n: int) -> None:
        for _ in range(n):
            x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
            got = await graphs.infer({"input": x})
            want = local.backend.run({"input": x})[0]
            np.testing.assert_allclose(got["output"], want, rtol=1e-3, atol=1e-4)

    try:
        asyncio.run(ask(6))
        assert all(r.served > 0 for r in graphs.replicas)
        ray.kill(ray.get_actor(by_box["b"]["actor"], namespace="edgemesh"))
        asyncio.run(ask(4))
        assert graphs.retries >= 1
        assert {r.box: r.down_until > 0 for r in graphs.replicas} == {"a": False, "b": True}
    finally:
        local.close()
        remove_replicas(ray, "cls", ["a", "b"])


def test_a_corrupt_source_is_refused_naming_the_file(cluster: Path, tmp_path: Path) -> None:
    from edgemesh.errors import PlanError
    from edgemesh.graph.manifest import MANIFEST
    from edgemesh.router.graph_place import GraphDeployOptions, place_replicas
    from edgemesh.router.graph_replica import intact_copy

    bad = tmp_path / "cls"
    shutil.copytree(cluster, bad)
    raw = (bad / MANIFEST).read_bytes()
    victim = json.loads(raw)["precisions"]["fp32"]["file"]
    data = bytearray((bad / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / victim).write_bytes(bytes(data))
    assert not intact_copy(bad, raw)
    source = _source("a", bad)
    try:
        with pytest.raises(PlanError, match=f"c: .*'{victim}' is corrupt: fetched copy has sha256"):
            place_replicas(
                ray, "bad", raw, ["c"], source=source, origin_box="a", package_dir=str(bad),
                options=GraphDeployOptions(threads=1),
            )  # fmt: skip
    finally:
        ray.kill(source)
    # Nothing of the refused replica is left running (a kill takes a moment to land).
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get_actor("edgemesh-graph-bad@c", namespace="edgemesh")
        except ValueError:
            break
        assert time.monotonic() < deadline, "the refused replica is still running"
        time.sleep(0.2)
