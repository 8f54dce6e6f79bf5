"""The management API's parts that need no model: the event log, jobs, the
monitoring history's maths, the Grafana dashboard's metric names, and the
API's errors and auth on a real gateway (uvicorn on loopback, httpx)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from edgemesh.errors import ConflictError, ModelNotFoundError
from edgemesh.gateway import create_app
from edgemesh.gateway.events import EventLog
from edgemesh.gateway.history import READ, histogram_quantile
from edgemesh.gateway.jobs import Jobs

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana" / "edgemesh.json"


def test_event_log_is_bounded_and_numbered() -> None:
    log = EventLog(capacity=3)
    for i in range(5):
        log.add("deploy", f"m{i}", model=f"m{i}")
    assert [e.message for e in log.since(0)] == ["m2", "m3", "m4"]
    assert [e.seq for e in log.since(4)] == [5]
    with pytest.raises(ValueError, match="unknown event kind"):
        log.add("party", "no")


def test_agent_membership_log_is_merged_once_and_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [
        {"kind": "join", "box_id": "pi-1", "role": "worker", "reason": "announced", "at": 10.0},
        {
            "kind": "crash",
            "box_id": "pi-1",
            "role": "worker",
            "reason": "Ray node died",
            "at": 20.0,
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + '{"kind": "head", "bo')
    log = EventLog()
    assert log.merge_agent_log(path) == 2
    assert log.merge_agent_log(path) == 0  # nothing new
    got = [(e.kind, e.box, e.level) for e in log.since(0)]
    assert got == [("join", "pi-1", "info"), ("lost", "pi-1", "warning")]
    assert "Ray node died" in log.since(0)[1].message
    with open(path, "a") as f:  # the half-written line is completed
        f.write('x_id": "nuc", "role": "head", "at": 30.0}\n')
    assert log.merge_agent_log(path) == 1
    assert log.since(2)[0].kind == "head"


def test_jobs_report_failures_and_refuse_a_second_run_on_one_target() -> None:
    failed = []
    jobs = Jobs(on_fail=lambda job, exc: failed.append((job.target, str(exc))))
    gate = __import__("threading").Event()

    def slow(job):
        gate.wait(10)
        return "done it", {"x": 1}

    first = jobs.start("deploy", "m", slow)
    with pytest.raises(ConflictError, match="already running"):
        jobs.start("undeploy", "m", slow)
    gate.set()
    bad = jobs.start("deploy", "n", lambda job: (_ for _ in ()).throw(ModelNotFoundError("gone")))
    deadline = time.monotonic() + 10
    while (first.state == "running" or bad.state == "running") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (first.state, first.message, first.result) == ("done", "done it", {"x": 1})
    assert bad.state == "failed" and "ModelNotFoundError: gone" in bad.message
    assert bad.to_dict()["error"] == "ModelNotFoundError" and first.to_dict()["error"] is None
    assert failed == [("n", "gone")]
    assert jobs.get(first.id) is first


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.5], 2 above 0.5 (+Inf)
    buckets = [(0.1, 4.0), (0.5, 8.0), (float("inf"), 10.0)]
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.6, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == 0.5  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def _exported_names(registry) -> set[str]:
    """Every sample name the registry can export, from its families' types."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("_sum", "_count", ""),
    }
    names = set()
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def _registry(app):
    reg = getattr(app.state, "metrics_registry", None)
    return reg if reg is not None else app.state.metrics.registry


def test_grafana_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    doc = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\bedgemesh_[a-z_]+", e)}
    exported = _exported_names(_registry(create_app([])))
    assert used, "the dashboard queries no edgemesh metric"
    assert used <= exported, f"not exported by the gateway: {sorted(used - exported)}"
    # the page's charts read the same registry
    assert set(READ) <= exported, sorted(set(READ) - exported)
    for p in doc["panels"]:
        assert p["title"] and p["datasource"]["uid"] == "${datasource}"


def test_api_errors_are_openai_shaped_and_the_key_guards_every_route(live_server) -> None:
    app = create_app([], api_keys=["k1"])
    with live_server(app) as srv:
        h = {"Authorization": "Bearer k1"}
        for method, path in [
            ("GET", "/api/overview"),
            ("GET", "/api/boxes"),
            ("POST", "/api/plan"),
            ("POST", "/api/boxes/x/drain"),
            ("GET", "/api/monitor"),
        ]:
            r = httpx.request(method, srv.url + path, json={})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        over = httpx.get(srv.url + "/api/overview", headers=h).json()
        assert over["mode"] == "single" and over["auth"] is True and over["boxes"] == 1
        r = httpx.post(srv.url + "/api/plan", headers=h, json={})
        assert r.status_code == 400 and r.json()["error"]["param"] == "package"
        r = httpx.post(srv.url + "/api/plan", headers=h, json={"package": "/no/such/dir"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "package_not_found"
        r = httpx.post(srv.url + "/api/boxes/x/drain", headers=h)
        assert r.status_code == 409
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"],
            "type": "conflict_error",
            "param": None,
            "code": "not_supported_here",
        }
        r = httpx.delete(srv.url + "/api/models/nope", headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.get(srv.url + "/api/jobs/nope", headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
        r = httpx.get(srv.url + "/api/monitor?window_s=abc", headers=h)
        assert r.status_code == 400
        box = httpx.get(srv.url + "/api/boxes", headers=h).json()["boxes"][0]
        assert box["live"]["memory_used_bytes"] > 0 and box["engines"]
        events = httpx.get(srv.url + "/api/events", headers=h).json()
        assert events["events"][0]["kind"] == "start"
        assert (
            httpx.get(srv.url + "/api/events?since=" + str(events["next"]), headers=h).json()[
                "events"
            ]
            == []
        )


def test_mesh_gateway_binds_loopback_unless_keyed_or_told() -> None:
    from edgemesh.router.deploy import gateway_bind

    head = "10.0.0.7"
    assert gateway_bind(None, head, keyed=False) == ("127.0.0.1", "127.0.0.1")
    assert gateway_bind(None, head, keyed=True) == (head, head)
    assert gateway_bind("mesh", head, keyed=False) == (head, head)
    assert gateway_bind("0.0.0.0", head, keyed=False) == ("0.0.0.0", head)
    assert gateway_bind("192.168.1.5", head, keyed=False) == ("192.168.1.5", "192.168.1.5")


def test_the_mesh_gateway_checks_keys_it_only_knows_by_digest(live_server) -> None:
    from edgemesh.router.deploy import gateway_keys, key_digests

    doc = {"api_key_sha256": key_digests(["site-key"])}
    assert "site-key" not in json.dumps(doc)  # the records never hold the key
    with live_server(create_app([], api_keys=gateway_keys(doc["api_key_sha256"]))) as srv:
        ok = httpx.get(srv.url + "/api/overview", headers={"Authorization": "Bearer site-key"})
        assert ok.status_code == 200
        digest = doc["api_key_sha256"][0]
        for wrong in ("other", digest, f"sha256:{digest}"):
            r = httpx.get(srv.url + "/api/overview", headers={"Authorization": f"Bearer {wrong}"})
            assert r.status_code == 401, wrong


def test_event_log_is_saved_bounded_and_read_back(tmp_path: Path) -> None:
    agent = tmp_path / "events.jsonl"  # the agent's own log: merged, never re-saved
    agent.write_text(json.dumps({"kind": "join", "box_id": "pi-1", "at": 5.0}) + "\n")
    log = EventLog(capacity=4)
    assert log.persist(tmp_path) == 0
    log.merge_agent_log(agent)
    for i in range(11):
        log.add("deploy", f"m{i}", model=f"m{i}")
    saved = (tmp_path / "gateway-events.jsonl").read_text().splitlines()
    # Rewritten at 2 x capacity lines: never more, and no merged agent event in it.
    assert 4 <= len(saved) <= 8 and all('"join"' not in line for line in saved)
    with open(tmp_path / "gateway-events.jsonl", "a") as f:
        f.write('{"seq": 99, "kind": "dep')  # a gateway killed mid-write
    again = EventLog(capacity=4)
    assert again.persist(tmp_path) >= 4
    got = again.since(0)
    assert [e.message for e in got][-4:] == ["m7", "m8", "m9", "m10"]
    assert got[-1].seq == log.last_seq  # numbering goes on where it stopped
    assert again.add("undeploy", "after").seq == log.last_seq + 1


def test_jobs_are_saved_and_a_running_one_comes_back_interrupted(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "gateway-jobs.json"
    jobs = Jobs(path=path)
    gate = threading.Event()
    done = jobs.start("deploy", "a", lambda job: ("deployed a", {"n": 1}))
    hung = jobs.start("replan", "b", lambda job: (gate.wait(30), ("never", None))[1])
    deadline = time.monotonic() + 10
    while done.state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # the save after the job finished
    back = Jobs(path=path)  # the gateway restarted while "b" was running
    gate.set()
    assert back.get(done.id).to_dict() == done.to_dict()
    lost = back.get(hung.id)
    assert lost.state == "failed" and lost.error == "Interrupted" and "interrupted" in lost.message
    assert [j.id for j in back.list()] == [hung.id, done.id]
    back.start("undeploy", "b", lambda job: ("ok", None))  # no longer counted as running


def test_a_restarted_gateway_still_shows_its_events_and_jobs(live_server, tmp_path: Path) -> None:
    from edgemesh.gateway.manager import LocalManager

    def app():
        return create_app([], manager=LocalManager(state_dir=tmp_path))

    from tests.fixtures.tiny_models import shared_tiny_package

    package = shared_tiny_package("llama")
    with live_server(app()) as srv:
        r = httpx.post(srv.url + "/api/models", json={"package": str(tmp_path / "nothing")})
        assert r.status_code == 404  # refused before a job: not in the history
        # A two-stage plan on one box: the job starts, then fails (an "error" event).
        two = {"stages": [{"box": "x"}, {"box": "y"}]}
        r = httpx.post(srv.url + "/api/models", json={"package": str(package), "plan": two})
        assert r.status_code == 202, r.text
        job = r.json()["job"]
        deadline = time.monotonic() + 60
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            job = httpx.get(srv.url + f"/api/jobs/{job['id']}").json()
        assert job["state"] == "failed", job
        first = httpx.get(srv.url + "/api/events").json()["events"]
        assert [e["kind"] for e in first] == ["start", "error"]
    with live_server(app()) as srv:
        events = httpx.get(srv.url + "/api/events").json()["events"]
        assert [e["kind"] for e in events] == ["start", "error", "start"]
        assert events[:2] == first
        (kept,) = httpx.get(srv.url + "/api/jobs").json()["jobs"]
        assert kept == job
