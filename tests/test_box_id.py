"""The default box id (issue 13, part 2): unique per box, stable, collisions refused.

Rule tests use the real state folder code; the collision test runs two real
`edgemesh join --no-ray` processes on loopback with the same `--box-id`.
Same-hostname namespace boxes forming a mesh with default flags: see
test_box_id_netns.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgemesh.errors import ConfigError
from edgemesh.fingerprint import box_facts, default_box_id
from edgemesh.mesh.box_id import (
    DERIVED,
    EXPLICIT,
    KEPT,
    BoxFacts,
    collision_hint,
    resolve_box_id,
)
from edgemesh.mesh.config import StatePaths

PI = BoxFacts("raspberrypi", "0123456789abcdef0123456789abcdef", "dc:a6:32:00:00:01")


def test_same_hostname_and_machine_id_differ_by_their_own_mac(tmp_path: Path) -> None:
    twin = BoxFacts(PI.hostname, PI.machine_id, "dc:a6:32:00:00:02")
    a = resolve_box_id(StatePaths(tmp_path / "a"), facts=PI)
    b = resolve_box_id(StatePaths(tmp_path / "b"), facts=twin)
    assert a.box_id != b.box_id
    assert a.box_id.startswith("raspberrypi-") and len(a.box_id) == len("raspberrypi-") + 6
    # The same facts always give the same id (a fresh state folder re-derives it).
    assert resolve_box_id(StatePaths(tmp_path / "c"), facts=PI).box_id == a.box_id
    # Cloned cards with different machine ids but the same MAC differ too.
    other_id = BoxFacts(PI.hostname, "f" * 32, PI.mac)
    assert resolve_box_id(StatePaths(tmp_path / "d"), facts=other_id).box_id != a.box_id


def test_the_id_is_kept_in_the_state_folder_and_survives_changes(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state")
    first = resolve_box_id(paths, facts=PI)
    assert first.source == DERIVED and paths.box_id.is_file()
    assert json.loads(paths.box_id.read_text())["box_id"] == first.box_id
    again = resolve_box_id(paths, facts=PI)
    assert (again.box_id, again.source, again.made_here) == (first.box_id, KEPT, True)
    # A new NIC or hostname does not rename the box; the id notes it was made elsewhere.
    moved = resolve_box_id(paths, facts=BoxFacts("renamed", PI.machine_id, "02:00:00:00:00:09"))
    assert (moved.box_id, moved.source, moved.made_here) == (first.box_id, KEPT, False)
    assert "copied from another box" in collision_hint(moved)
    assert str(paths.box_id) in collision_hint(moved)


def test_an_explicit_id_wins_and_is_not_written(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state")
    got = resolve_box_id(paths, "shelf-2", facts=PI)
    assert (got.box_id, got.source) == ("shelf-2", EXPLICIT)
    assert not paths.box_id.exists()
    assert "--box-id" in collision_hint(got)
    with pytest.raises(ConfigError, match="invalid box id"):
        resolve_box_id(paths, "has space", facts=PI)


def test_without_machine_id_or_mac_a_random_suffix_is_kept(tmp_path: Path) -> None:
    bare = BoxFacts("container", None, None)
    a = resolve_box_id(StatePaths(tmp_path / "a"), facts=bare)
    b = resolve_box_id(StatePaths(tmp_path / "b"), facts=bare)
    assert a.box_id != b.box_id and a.box_id.startswith("container-")
    assert resolve_box_id(StatePaths(tmp_path / "a"), facts=bare).box_id == a.box_id


def test_a_damaged_id_file_is_refused_with_a_fix(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state").ensure()
    paths.box_id.write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        resolve_box_id(paths, facts=PI)


def test_the_fingerprint_id_is_the_mesh_default_on_this_box(tmp_path: Path) -> None:
    """`edgemesh info` prints the id a fresh `edgemesh join` derives here, so
    profiles from `info --json` match the mesh's box ids."""
    from edgemesh.fingerprint import collect

    facts = BoxFacts(*box_facts())
    assert collect().id == default_box_id(facts.hostname, facts.machine_id, facts.mac)
    assert resolve_box_id(StatePaths(tmp_path / "s"), facts=facts).box_id == collect().id


def test_a_duplicate_seen_after_probing_is_refused_and_the_first_box_stays(
    tmp_path: Path,
) -> None:
    """mDNS probing can miss a duplicate (both probe at once, or a box too loaded
    to answer in time); the browse then sees a record with this box's id from
    another incarnation. The younger box leaves with the collision error; the
    older one ignores it and announces again."""
    from dataclasses import replace

    from edgemesh.mesh.agent import Agent
    from edgemesh.mesh.config import JoinSettings, MeshSecret
    from edgemesh.mesh.network import MeshInterface

    def agent(name: str) -> Agent:
        settings = JoinSettings(mesh="lab", state_dir=tmp_path / name, box_id="twin").resolved()
        return Agent(
            settings,
            MeshSecret(b"the-shared-mesh-secret-0123456789"),
            start_ray=False,
            interface=MeshInterface("lo", "127.0.0.1"),
        )

    young = agent("young")
    older = replace(young.record, started=young.record.started - 5, address="10.0.0.9")
    young._on_record(older)
    assert young.membership.get("twin") is None  # never mixed into its own entry
    with pytest.raises(ConfigError, match=r"another box already announces the id 'twin'") as err:
        young._tick()
    assert "10.0.0.9" in str(err.value) and "--box-id" in str(err.value)

    old = agent("old")
    newer = replace(old.record, started=old.record.started + 5, address="10.0.0.8")
    old._on_record(newer)
    assert old._collision is None and old._reannounce.is_set()
    old._on_record(old.record)  # its own record read back is no duplicate
    assert old._collision is None


def _join(state: Path, mesh: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgemesh", "join", "--mesh", mesh, "--state-dir", str(state),
         "--interface", "127.0.0.1", "--settle", "1", "--no-ray", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def test_two_boxes_announcing_one_explicit_id_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
    mesh = f"t{uuid.uuid4().hex[:10]}"
    first = _join(tmp_path / "a", mesh, "--box-id", "twin")
    second: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "a" / "state.json").exists():
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "secret").write_bytes((tmp_path / "a" / "secret").read_bytes())
        (tmp_path / "b" / "secret").chmod(0o600)
        second = _join(tmp_path / "b", mesh, "--box-id", "twin")
        _, err = second.communicate(timeout=180)  # slow on a loaded 2-core host
        assert second.returncode == 1, err
        assert "another box already announces the id 'twin'" in err
        assert "give each box its own --box-id" in err
        assert first.poll() is None  # the box that was there first keeps running
    finally:
        # Both boxes go, whatever failed: a timed-out second join must not outlive the test.
        for proc in (second, first):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
