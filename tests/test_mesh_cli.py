"""`edgemesh join` and `edgemesh status` as a user runs them, on loopback.

The join runs as a real process (discovery only, ``--no-ray``, so this stays
fast); status reads the running agent, or browses mDNS with a secret file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")


def edgemesh(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgemesh", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def joined(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """A box that joined a fresh mesh without a secret file."""
    mesh = f"t{uuid.uuid4().hex[:10]}"
    state = tmp_path / "box-a"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemesh", "join", "--mesh", mesh, "--state-dir", str(state),
         "--box-id", "box-a", "--interface", "127.0.0.1", "--settle", "1", "--no-ray"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield mesh, state, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_head(state: Path, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = edgemesh("status", "--json", "--state-dir", state)
        if out.returncode == 0:
            doc = json.loads(out.stdout)
            if doc["role"] == "head" and doc["boxes"] and doc["boxes"][0]["health"] == "ok":
                return doc
        time.sleep(0.5)
    raise AssertionError(f"no head within {timeout} s: {out.stdout} {out.stderr}")


def test_join_creates_a_secret_and_status_lists_the_box(
    joined: tuple[str, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    mesh, state, proc = joined
    doc = wait_for_head(state)
    assert doc["mesh"] == mesh and doc["source"] == "agent" and doc["head"] == "box-a"
    box = doc["boxes"][0]
    assert (box["id"], box["role"], box["address"]) == ("box-a", "head", "127.0.0.1")
    assert box["fingerprint"]["digest"] and box["fingerprint"]["arch"]

    secret = state / "secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (state / "ray_token").stat().st_mode & 0o777 == 0o600

    # From another state folder: no agent there, so status browses mDNS and
    # needs the secret; with it the box is listed, with another it is not.
    other = tmp_path / "box-b"
    browse = ["--mesh", mesh, "--state-dir", other, "--interface", "127.0.0.1", "--wait", "2.5"]
    out = edgemesh("status", "--json", *browse, "--secret-file", secret)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["source"] == "mdns" and [b["id"] for b in seen["boxes"]] == ["box-a"]
    assert seen["head"] == "box-a"
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("a passphrase nobody else has")
    wrong.chmod(0o600)
    out = edgemesh("status", "--json", *browse, "--secret-file", wrong)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    ours = [r["reason"] for r in seen["rejected"] if f"@{mesh}." in r["name"]]
    assert seen["boxes"] == [] and ours == ["signature"]  # other meshes may share loopback
    out = edgemesh("status", "--mesh", mesh, "--state-dir", other, "--interface", "127.0.0.1")
    assert out.returncode == 1 and "secret" in out.stderr

    # Leaving: SIGTERM ends the agent cleanly and its state says so.
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert "Created a new secret" in err and "--secret-file" in err
    assert "scp -p" in err and secret.read_text().strip() not in err
    final = json.loads((state / "state.json").read_text())
    assert final["running"] is False
    out = edgemesh("status", "--json", "--state-dir", state, "--interface", "127.0.0.1",
                   "--wait", "1")  # fmt: skip
    assert out.returncode == 0 and json.loads(out.stdout)["source"] == "mdns"


def test_join_refuses_a_missing_secret_file_and_a_bad_mesh_name(tmp_path: Path) -> None:
    out = edgemesh("join", "--mesh", "lab", "--state-dir", tmp_path / "s",
                   "--secret-file", tmp_path / "nope", "--no-ray")  # fmt: skip
    assert out.returncode == 1 and "no secret file" in out.stderr
    assert not (tmp_path / "s" / "secret").exists()
    out = edgemesh("join", "--mesh", "Bad Name", "--state-dir", tmp_path / "s2", "--no-ray")
    assert out.returncode == 1 and "invalid mesh name" in out.stderr
