"""The typed records that cross boxes and files (``edgemesh.mesh.deployment_record``):
round trips through JSON and msgpack, version refusal, and records written
before versions existed (the form on disk before this change)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edgemesh.errors import RecordError, RecordVersionError
from edgemesh.mesh.deployment_record import (
    RECORD_VERSION,
    DeploymentRecord,
    Deployments,
    GraphRecord,
    PackageRef,
    StageInfo,
)
from edgemesh.mesh.deployments import DeploymentStore, sync
from edgemesh.sharding.package.folder import open_package, range_artifacts
from edgemesh.sharding.planner.boxes import BoxProfile, Link
from edgemesh.sharding.planner.costs import PlanOptions
from edgemesh.sharding.planner.plan import Plan, plan
from tests.fixtures.tiny_models import shared_tiny_package


@pytest.fixture(scope="module")
def package() -> Path:
    return shared_tiny_package("qwen3")  # 3 layers


@pytest.fixture(scope="module")
def ref(package: Path) -> PackageRef:
    return PackageRef.from_folder(package, origin_box="a")


def _profiles(ref: PackageRef) -> list[BoxProfile]:
    m = ref.manifest
    layer = max(c.weight_bytes["fp32"] for c in m.layers)
    ends = max(m.embedding.weight_bytes["fp32"], m.head.weight_bytes["fp32"])
    compute = {"onnxruntime/fp32": {"gflops": 10.0, "bandwidth_gbps": 5.0}}
    # Room for the embedding or the head with two layers, not the whole model
    # (the embedding and head dwarf a tiny model's layers): a two-stage plan.
    return [
        BoxProfile.from_dict(
            {
                "id": b,
                "memory_limit_bytes": ends + 2 * layer + 90_000,
                "backends": ["onnxruntime"],
                "compute": compute,
            }
        )
        for b in ("a", "b")
    ]


@pytest.fixture(scope="module")
def placed(ref: PackageRef) -> Plan:
    options = PlanOptions(context=64, sequences=2, headroom=0.0, runtime_overhead_bytes=0)
    return plan(ref.manifest, _profiles(ref), None, options)


@pytest.fixture(scope="module")
def record(ref: PackageRef, placed: Plan) -> DeploymentRecord:
    return DeploymentRecord.new(
        "tiny",
        ref,
        placed,
        _profiles(ref),
        [Link("a", "b", 0.94, 0.3)],
        gateway="http://127.0.0.1:8000/v1",
        deployed=1700000000.5,
    )


def _old_form(record: DeploymentRecord) -> dict[str, object]:
    """What ``edgemesh deploy`` wrote before records had a version: the same
    keys as today less ``version`` and ``limits``, raw profile dicts as
    ``fingerprint.usable_profile`` returned them, and the four stage keys."""
    ref = record.package
    return {
        "name": record.name,
        "manifest": ref.manifest_bytes.decode(),
        "package_dir": ref.path,
        "origin_box": ref.origin_box,
        "plan": record.plan.to_dict(),
        "profiles": [
            {
                "id": p.id,
                "memory_limit_bytes": p.memory_limit_bytes,
                "backends": list(p.backends),
                "compute": {"onnxruntime/fp32": {"gflops": 10.0, "bandwidth_gbps": 5.0}},
            }
            for p in record.profiles
        ],
        "links": [],
        "stages": [
            {"box": s.box, "layers": list(s.layers), "backend": s.backend, "precision": s.precision}
            for s in record.stages
        ],
        "gateway": record.gateway,
        "deployed": record.deployed,
    }


def test_the_plan_places_two_stages(placed: Plan) -> None:
    assert [s.box for s in placed.stages] == ["a", "b"]  # the fixture means what it says


def test_a_record_round_trips_through_json_and_msgpack(record: DeploymentRecord) -> None:
    msgpack = pytest.importorskip("msgpack")
    wire = record.to_dict()
    assert wire["version"] == RECORD_VERSION
    assert DeploymentRecord.from_dict(json.loads(json.dumps(wire))) == record
    assert DeploymentRecord.from_dict(msgpack.unpackb(msgpack.packb(wire))) == record
    back = DeploymentRecord.from_dict(wire)
    # The manifest travels as its exact bytes (cache folders are named by their sha256).
    assert back.package.manifest_bytes == record.package.manifest_bytes
    assert back.package.manifest == record.package.manifest
    assert [s.layers for s in back.stages] == [
        (s.layers.start, s.layers.stop) for s in record.plan.stages
    ]


def test_a_record_carries_its_serving_limits(record: DeploymentRecord) -> None:
    from edgemesh.limits import ServingLimits

    limited = replace(record, limits=ServingLimits(max_queue=7, threads=2))
    wire = json.loads(json.dumps(limited.to_dict()))
    assert wire["limits"]["max_queue"] == 7
    assert DeploymentRecord.from_dict(wire).limits == ServingLimits(max_queue=7, threads=2)
    assert "limits" not in record.to_dict()  # none given: the defaults, nothing written


def test_a_record_without_a_version_reads_as_version_1(record: DeploymentRecord) -> None:
    old = _old_form(record)
    read = DeploymentRecord.from_dict(old)
    assert read.version == 1 and read.limits is None
    assert read.plan == record.plan and read.stages == record.stages
    assert [p.id for p in read.profiles] == ["a", "b"]
    assert read.package.path == record.package.path and read.package.origin_box == "a"
    # Written back, it gains its version and keeps every key it had.
    again = read.to_dict()
    assert again["version"] == 1 and set(old) <= set(again)


@pytest.mark.parametrize("version", [2, 0, "1", True])
def test_a_record_of_another_version_is_refused_naming_both(
    record: DeploymentRecord, version: object
) -> None:
    wire = {**record.to_dict(), "version": version}
    with pytest.raises(RecordVersionError) as err:
        DeploymentRecord.from_dict(wire)
    assert err.value.found == version and err.value.expected == RECORD_VERSION
    assert repr(version) in str(err.value) and f"version {RECORD_VERSION}" in str(err.value)
    assert "'tiny'" in str(err.value) and err.value.hint


def test_a_malformed_record_is_a_record_error_naming_the_model(
    record: DeploymentRecord,
) -> None:
    wire = record.to_dict()
    del wire["plan"]
    with pytest.raises(RecordError, match="'tiny'"):
        DeploymentRecord.from_dict(wire)
    with pytest.raises(RecordError, match="stage entry"):
        StageInfo.from_dict({"box": "a", "layers": [0]})


def test_unknown_keys_survive_a_round_trip(record: DeploymentRecord) -> None:
    wire = {**record.to_dict(), "note": {"by": "a newer box"}}
    assert DeploymentRecord.from_dict(wire).to_dict()["note"] == {"by": "a newer box"}


def test_stage_info_keeps_what_runs_it_and_the_record_keeps_where(
    record: DeploymentRecord, placed: Plan
) -> None:
    running = StageInfo("b", 1, 3, "onnxruntime", "fp32", host="h", pid=42, fetched=True)
    assert StageInfo.from_dict(running.to_dict()) == running
    assert running.to_dict()["pid"] == 42
    moved = record.moved([running, StageInfo("a", 0, 1, "onnxruntime", "fp32")], placed)
    assert moved.stages[0] == running.placement()
    assert set(moved.to_dict()["stages"][0]) == {"box", "layers", "backend", "precision"}
    assert StageInfo.from_dict({**running.to_dict(), "in_process": True}).in_process


def test_the_document_keeps_other_keys_and_old_documents_read(
    record: DeploymentRecord,
) -> None:
    old = {
        "version": 5,
        "updated": 12.0,
        "models": {"tiny": _old_form(record)},
        "gateway": "http://10.0.0.1:8000/v1",
        "graphs": {"det": _graph_wire()},
    }
    doc = Deployments.from_dict(old)
    assert doc.revision == 5 and doc.gateway_host is None and doc.api_key_sha256 == []
    assert doc.gateway_url() == "http://10.0.0.1:8000/v1"
    wire = doc.to_dict()
    assert doc.graphs["det"].boxes == ["pi", "jetson"]
    assert wire["graphs"] == old["graphs"] and wire["version"] == 5
    assert "gateway_host" not in wire  # absent stays absent: restore binds old records the old way
    assert Deployments.from_dict(json.loads(json.dumps(wire))) == doc
    with pytest.raises(RecordError, match="'models'"):
        Deployments.from_dict({"version": 1})


def _graph_wire() -> dict:
    """A graph record as `edgemesh deploy DIR` writes it (router.graph_place.graph_record)."""
    return {
        "kind": "graph",
        "name": "det",
        "manifest": '{"name": "det"}',
        "package_dir": "/data/det",
        "origin_box": "pi",
        "replicas": [
            {"box": "pi", "backend": "openvino", "precision": "int8", "p50_ms": 3.1},
            {"box": "jetson", "backend": "onnxruntime", "precision": "fp32", "p50_ms": 3.4},
        ],
        "not_chosen": {"nuc": 9.5, "old": None},
        "refused": {"rk": "no engine for Resize"},
        "replicas_wanted": None,
        "max_accuracy_loss": 0.0,
        "threads": 2,
        "gateway": "http://10.0.0.1:8000/v2",
        "deployed": 17.0,
    }


def test_a_graph_record_round_trips_and_keeps_what_it_does_not_know() -> None:
    wire = _graph_wire() | {"later_key": [1, 2]}
    rec = GraphRecord.from_dict(json.loads(json.dumps(wire)))
    assert rec.boxes == ["pi", "jetson"] and rec.not_chosen == {"nuc": 9.5, "old": None}
    assert rec.max_accuracy_loss == 0.0  # a recorded 0 is not the default
    assert rec.to_dict() == wire
    older = {k: v for k, v in _graph_wire().items() if k != "max_accuracy_loss"}
    assert GraphRecord.from_dict(older).max_accuracy_loss is None


@pytest.mark.parametrize(
    "broken",
    [{"manifest": None} | {"name": ""}, {"replicas": [{"backend": "openvino"}]}, {"threads": "x"}],
)
def test_a_malformed_graph_record_is_a_record_error(broken: dict) -> None:
    wire = {k: v for k, v in (_graph_wire() | broken).items() if v is not None}
    with pytest.raises(RecordError, match="graph record"):
        GraphRecord.from_dict(wire)
    with pytest.raises(RecordError):
        Deployments.from_dict({"models": {}, "graphs": {"det": wire}})


def test_the_store_types_its_records_and_sync_mirrors_what_it_cannot_read(
    record: DeploymentRecord, tmp_path: Path
) -> None:
    store = DeploymentStore(tmp_path / "deployments.json")
    store.put(record)
    assert store.deployments().models["tiny"] == record
    assert store.deployments().revision == 1
    # A record from a newer format is not this box's to read, but the mirror
    # must still carry it (another box may read it) rather than drop it.
    newer = {
        "version": 9,
        "updated": 1.0,
        "models": {"future": {"version": RECORD_VERSION + 1, "name": "future"}},
    }
    kv: dict[str, bytes] = {"deployments": json.dumps(newer).encode()}
    assert sync(store, kv.get, kv.__setitem__) == "pulled"
    assert store.models() == newer["models"]
    with pytest.raises(RecordVersionError):
        store.deployments()


def test_a_range_lists_its_files_from_the_manifest_alone(package: Path, ref: PackageRef) -> None:
    folder = open_package(package)
    for start, stop in [(0, 1), (1, 3), (0, 3)]:
        files = range_artifacts(ref.manifest, start, stop, "fp32")
        assert files == folder.artifacts_for(start, stop, "fp32")
        assert all((package / f).is_file() for f in files)
        with_tok = ref.range_files(start, stop, "fp32")
        assert with_tok[: len(files)] == files and with_tok[len(files) :] == ["tokenizer.json"]
    assert "fp32/head.onnx" in range_artifacts(ref.manifest, 1, 3, "fp32")
    assert "fp32/embed.onnx" not in range_artifacts(ref.manifest, 1, 3, "fp32")
    from edgemesh.errors import ConfigError

    with pytest.raises(ConfigError, match="not inside"):
        range_artifacts(ref.manifest, 2, 9, "fp32")


def test_a_package_ref_knows_where_its_path_means_something(ref: PackageRef) -> None:
    assert ref.path_on("a") == ref.path and ref.path_on("b") == ""
    assert PackageRef.from_dict(ref.to_dict()) == ref
    assert set(ref.all_files()) == {a.path for a in ref.manifest.artifacts}
    from edgemesh.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        PackageRef.from_folder(Path("/nonexistent-edgemesh-package"))
