"""Managing a live mesh from its page's API: two network-namespace boxes,
each running `edgemesh join --gateway`.

1. A fresh mesh: the head starts the mesh gateway at formation, with no
   model, so the page (its /api) is there to deploy the first model;
2. the first model is deployed from the API over both boxes and answers;
3. a long stream runs while the worker box is drained from the API (what
   the page's Drain calls): the model's layers are re-planned onto the
   head, moved live, and the stream goes on to its last token (not cut);
   the model still answers;
4. the drained box keeps announcing (alive, in the box list, "draining"),
   and the watcher's rounds never put a stage back on it; Undrain clears it;
5. a graph (vision) package deployed from the API gets whole replicas on
   the boxes, answers on /v2, and is undeployed, the LLM serving on;
6. Remove asks the worker's `edgemesh join` to leave: it exits, the box
   leaves the list, and the model still answers on the head;
7. the gateway's events (deploy, drain, re-plan, remove) are in its state
   folder (`gateway-events.jsonl`), so a restarted gateway shows them.

Subnet 10.87.0 and prefix "ehd" are this module's own. Needs root,
iproute2 and the mesh extra; skipped with the reason otherwise. Everything
is removed in finally.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgemesh.lab.meshlab import MeshBox, equal_split, formed, wait_until
from edgemesh.lab.netns import NetnsLab
from edgemesh.lab.netns import skip_reason as netns_skip_reason
from edgemesh.reexec import edgemesh_argv
from tests.fixtures.tiny_models import shared_tiny_package

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = netns_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")
pytest.importorskip("torch", reason="builds the graph package (edgemesh[import-torch])")

MESH = "managelab"
SUBNET = "10.87.0"
HOST = 254
PORT = 8000
TIMEOUT_S = 240.0
STREAM_TOKENS = 400  # the tiny model's context is 512: long enough to drain mid-stream


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(2, subnet=SUBNET, host_address=HOST, prefix="ehd")
    try:
        yield lab
    finally:
        lab.close()


def _join_with_gateway(b: MeshBox) -> None:
    """`edgemesh join` as MeshBox.join runs it, plus --gateway on the mesh address."""
    argv = edgemesh_argv("join", "--mesh", b.mesh, "--secret-file", b.secret)
    argv += ["--state-dir", b.state, "--box-id", b.id, "--interface", "eth0", "--settle", "2",
             "--gateway", "--gateway-host", "mesh", "--gateway-port", str(PORT)]  # fmt: skip
    b.proc = b.box.spawn(argv, env=b.box.env(), log=b.box.dir / "join.log")


def _job(base: str, job: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(1.0)
        job = httpx.get(f"{base}/api/jobs/{job['id']}", timeout=30).json()
    return job


def _stages(base: str, name: str) -> list[dict[str, Any]]:
    models = httpx.get(base + "/api/models", timeout=30).json()["models"]
    return next(m["stages"] for m in models if m["name"] == name)


def _complete(base: str, name: str, n: int = 6) -> int:
    r = httpx.post(
        base + "/v1/completions",
        json={"model": name, "prompt": "hello", "max_tokens": n, "ignore_eos": True},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["completion_tokens"])


def test_a_fresh_mesh_deploys_from_its_page_then_drains_and_removes_a_live_box(
    lab: NetnsLab, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edgemesh.graph.build import build_package
    from edgemesh.mesh.config import create_secret

    package = shared_tiny_package("llama")
    graph = tmp_path / "graphs" / "cls"
    build_package("tests.graph_models:classifier", graph)
    monkeypatch.setenv("EDGEMESH_PACKAGES", str(package.parent))
    secret = create_secret(lab.root / "mesh.secret").source
    assert secret is not None
    boxes = [MeshBox(b, secret, MESH) for b in lab.boxes]

    def logs() -> str:
        out = []
        for b in boxes:
            restore = b.state / "restore.log"
            tail = restore.read_text(errors="replace")[-3000:] if restore.exists() else ""
            out.append(f"--- {b.box.name} ({b.id})\n{b.log_tail()}\n--- restore\n{tail}")
            # The gateway replica's own log holds the traceback behind a 500.
            for log in sorted(b.state.glob("ray/session_latest/logs/serve/replica_*.log")):
                out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    try:
        for b in boxes:
            _join_with_gateway(b)
        head_id = wait_until(lambda: formed(boxes), TIMEOUT_S, logs)
        head = next(b for b in boxes if b.id == head_id)
        worker = next(b for b in boxes if b.id != head_id)
        base = f"http://{head.box.address}:{PORT}"

        # -- 1. the page is there before any deploy ------------------------------
        def overview() -> dict[str, Any] | None:
            try:
                r = httpx.get(base + "/api/overview", timeout=10)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code == 200 else None

        over = wait_until(overview, TIMEOUT_S, logs)
        assert over["mode"] == "mesh" and over["models"] == 0, over
        wait_until(
            lambda: len(httpx.get(base + "/api/boxes", timeout=30).json()["boxes"]) == 2,
            60,
            logs,
        )

        # -- 2. the first model, from the API, over both boxes --------------------
        ask = {"package": str(package), "box": head.id}
        r = httpx.post(base + "/api/plan", json=ask, timeout=600)
        assert r.status_code == 200, r.text
        plan = equal_split(r.json()["plan"])
        assert {s["box"] for s in plan["stages"]} == {head.id, worker.id}
        r = httpx.post(
            base + "/api/models",
            json={"package": str(package), "box": head.id, "name": "tiny", "plan": plan},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        job = _job(base, r.json()["job"])
        assert job["state"] == "done", job["message"] + logs()
        assert {s["box"] for s in _stages(base, "tiny")} == {head.id, worker.id}
        assert _complete(base, "tiny") == 6

        # -- 3. drain the worker while a stream runs -----------------------------
        got: dict[str, Any] = {"tokens": 0, "finish": None, "error": None, "usage": None}
        first = threading.Event()

        def stream() -> None:
            body = {
                "model": "tiny",
                "prompt": "hello",
                "max_tokens": STREAM_TOKENS,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as s:
                    for line in s.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            got["error"] = chunk["error"]
                            continue
                        if chunk.get("usage"):
                            got["usage"] = chunk["usage"]["completion_tokens"]
                        for c in chunk.get("choices", []):
                            got["tokens"] += 1
                            first.set()
                            if c.get("finish_reason"):
                                got["finish"] = c["finish_reason"]
            except Exception as exc:  # reported by the assertion below
                got["error"] = repr(exc)
            finally:
                first.set()

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first.wait(120), logs()
        r = httpx.post(f"{base}/api/boxes/{worker.id}/drain", timeout=60)
        assert r.status_code == 202, r.text
        job = _job(base, r.json()["job"])
        assert job["state"] == "done", job["message"] + logs()
        assert job["result"]["moved"] == ["tiny"]
        during = got["tokens"]
        t.join(600)
        assert got["error"] is None, got
        assert got["finish"] == "length" and got.get("usage") == STREAM_TOKENS, got
        assert during < STREAM_TOKENS, "the stream ended before the drain: no proof"
        assert {s["box"] for s in _stages(base, "tiny")} == {head.id}
        assert _complete(base, "tiny") == 6

        # -- 4. it stays drained while it announces ------------------------------
        for _ in range(4):  # the membership watcher polls every 2 s
            time.sleep(3)
            rows = {b["id"]: b for b in httpx.get(base + "/api/boxes", timeout=30).json()["boxes"]}
            assert rows[worker.id]["draining"] and rows[worker.id]["health"] == "draining"
            assert {s["box"] for s in _stages(base, "tiny")} == {head.id}
        r = httpx.post(base + "/api/plan", json=ask, timeout=600)
        assert {s["box"] for s in r.json()["plan"]["stages"]} == {head.id}  # plans skip it
        r = httpx.post(f"{base}/api/boxes/{worker.id}/undrain", timeout=60)
        assert _job(base, r.json()["job"])["state"] == "done"
        rows = {b["id"]: b for b in httpx.get(base + "/api/boxes", timeout=30).json()["boxes"]}
        assert not rows[worker.id]["draining"] and rows[worker.id]["health"] == "ok"

        # -- 5. a graph (vision) package from the API: replicas, /v2, undeploy -----
        r = httpx.post(
            base + "/api/models", json={"package": str(graph), "box": head.id}, timeout=60
        )
        assert r.status_code == 202, r.text
        job = _job(base, r.json()["job"])
        assert job["state"] == "done", job["message"] + logs()
        gname = job["target"]
        assert {x["box"] for x in job["result"]["replicas"]} <= {head.id, worker.id}
        meta = httpx.get(f"{base}/v2/models/{gname}", timeout=30).json()
        inputs = []
        for spec in meta["inputs"]:
            shape = [1 if d < 0 else d for d in spec["shape"]]
            inputs.append(
                {
                    "name": spec["name"],
                    "shape": shape,
                    "datatype": spec["datatype"],
                    "data": [0] * math.prod(shape),
                }
            )
        r = httpx.post(f"{base}/v2/models/{gname}/infer", json={"inputs": inputs}, timeout=120)
        assert r.status_code == 200, r.text
        listed = httpx.get(base + "/api/models", timeout=30).json()["graph_models"]
        assert [g["name"] for g in listed] == [gname]
        r = httpx.delete(f"{base}/api/models/{gname}", timeout=60)
        assert _job(base, r.json()["job"])["state"] == "done"
        assert httpx.get(f"{base}/v2/models/{gname}", timeout=30).status_code == 404
        assert _complete(base, "tiny") == 6  # the LLM served on through all of it

        # -- 6. remove the live worker -------------------------------------------
        r = httpx.delete(f"{base}/api/boxes/{worker.id}", timeout=60)
        assert r.status_code == 202, r.text
        job = _job(base, r.json()["job"])
        assert job["state"] == "done", job["message"] + logs()
        assert worker.proc is not None
        assert worker.proc.wait(timeout=120) is not None  # its join left
        wait_until(
            lambda: (
                worker.id
                not in {b["id"] for b in httpx.get(base + "/api/boxes", timeout=30).json()["boxes"]}
            ),
            120,
            logs,
        )
        assert _complete(base, "tiny") == 6

        # -- 7. the events are kept in the head's state folder -------------------
        kinds = [e["kind"] for e in httpx.get(base + "/api/events", timeout=30).json()["events"]]
        assert {"deploy", "drain", "replan", "remove"} <= set(kinds), kinds
        saved = Path(head.state, "gateway-events.jsonl").read_text().splitlines()
        assert {"deploy", "drain", "replan", "remove"} <= {json.loads(x)["kind"] for x in saved}
    finally:
        for b in boxes:
            b.pull_plug()
