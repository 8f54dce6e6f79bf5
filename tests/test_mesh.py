"""Fast tests of the mesh's pure parts: records and their HMAC, the secret and
what is derived from it, settings, the election rule, membership events,
Ray's command line, and status built from an agent's state document."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edgemesh.errors import AuthError, BoxLostError, ConfigError, DiscoveryError
from edgemesh.fingerprint import collect
from edgemesh.mesh import MeshStatus, follow, ray_connection, read_status
from edgemesh.mesh.config import (
    JoinSettings,
    MeshSecret,
    StatePaths,
    check_mesh_name,
    create_secret,
    default_ray_temp_dir,
    default_state_dir,
    load_settings,
    read_secret,
    resolve_secret,
    write_json,
)
from edgemesh.mesh.election import FOLLOW, LEAD, WAIT, decide
from edgemesh.mesh.membership import CRASH, HEAD_CHANGE, JOIN, LEAVE, EventLog, Membership
from edgemesh.mesh.ray_node import HEALTH_ENV, RaySpec, box_resources, prune_sessions
from edgemesh.mesh.records import (
    CANDIDATE,
    HEAD,
    SERVICE_TYPE,
    WORKER,
    BoxRecord,
    RecordRejected,
    compact_summary,
    encode,
    parse,
)
from edgemesh.mesh.status import from_agent, health, render

SYSROOTS = Path(__file__).parent / "data" / "sysroots"
KEY = b"k" * 32


def record(box_id: str = "a", started: float = 100.0, role: str = CANDIDATE, **kw) -> BoxRecord:
    base = {
        "mesh": "lab",
        "box_id": box_id,
        "role": role,
        "address": "10.0.0.1",
        "started": started,
        "version": "0.1.0",
        "ray_version": "2.60.0",
    }
    base.update(kw)
    return BoxRecord(**base)


def as_wire(props: dict[str, str]) -> dict[bytes, bytes]:
    """What zeroconf hands the browser: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in props.items()}


def decode(props: dict[str, str], key: bytes = KEY, **kw) -> BoxRecord:
    opts = {"mesh": "lab", "version": "0.1.0", "ray_version": "2.60.0", **kw}
    return parse(as_wire(props), key, **opts)


# -- records -------------------------------------------------------------


def test_record_round_trips_through_signed_txt() -> None:
    fp = collect(SYSROOTS / "jetson-agx-orin")
    rec = record(
        "jetson-1",
        started=1712345678.123,
        role=HEAD,
        ray_address="10.0.0.1:6379",
        ready=True,
        seq=7,
        fp_digest=fp.digest(),
        summary=fp.summary(),
    )
    props = encode(rec, KEY)
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in props.items())
    back = decode(props)
    assert back == rec
    assert back.summary["accelerators"] == ["jetson-gpu"]
    assert back.summary["arch"] == "aarch64"
    assert back.summary["memory_limit_bytes"] == fp.summary()["memory_limit_bytes"]


def test_record_never_carries_the_secret_or_the_key() -> None:
    secret = MeshSecret(b"s3cret-bytes-for-the-mesh-0123456789")
    key = secret.mdns_key("lab")
    props = encode(record(), key)
    blob = json.dumps(props)
    assert secret._raw.hex() not in blob and key.hex() not in blob
    assert secret.ray_token("lab") not in blob


@pytest.mark.parametrize(
    "field,value",
    [("r", HEAD), ("ray", "6.6.6.6:6379"), ("ip", "6.6.6.6"), ("t0", "1"), ("fp", "x")],
)
def test_a_changed_field_fails_the_hmac(field: str, value: str) -> None:
    props = encode(record(), KEY)
    props[field] = value
    with pytest.raises(RecordRejected) as err:
        decode(props)
    assert err.value.reason == "signature"


def test_a_record_signed_with_another_secret_is_rejected() -> None:
    props = encode(record(), MeshSecret(b"x" * 32).mdns_key("lab"))
    with pytest.raises(RecordRejected) as err:
        decode(props, MeshSecret(b"y" * 32).mdns_key("lab"))
    assert err.value.reason == "signature"


def test_records_of_another_mesh_or_version_are_rejected() -> None:
    with pytest.raises(RecordRejected) as err:
        decode(encode(record(mesh="other"), KEY))
    assert err.value.reason == "mesh"
    with pytest.raises(RecordRejected) as err:
        decode(encode(record(version="0.2.0"), KEY))
    assert err.value.reason == "version"
    with pytest.raises(RecordRejected) as err:
        decode(encode(record(ray_version="2.59.0"), KEY))
    assert err.value.reason == "version"
    # A patch release still interoperates.
    assert decode(encode(record(version="0.1.7"), KEY)).version == "0.1.7"


def test_malformed_records_are_rejected() -> None:
    props = encode(record(), KEY)
    unsigned = {k: v for k, v in props.items() if k != "sig"}
    with pytest.raises(RecordRejected) as err:
        decode(unsigned)
    assert err.value.reason == "malformed"
    props = encode(record(), KEY)
    props["r"] = "king"
    from edgemesh.mesh.records import sign

    props["sig"] = sign(props, KEY)
    with pytest.raises(RecordRejected) as err:
        decode(props)
    assert err.value.reason == "malformed"
    assert isinstance(err.value, DiscoveryError)


def test_signature_covers_the_service_type() -> None:
    from edgemesh.mesh.records import _canonical

    assert _canonical({"a": "1"}).startswith(SERVICE_TYPE.encode())


def test_compact_summary_fits_one_txt_entry() -> None:
    summary = {
        "arch": "x86_64",
        "cores_effective": 64.0,
        "memory_limit_bytes": 1 << 40,
        "board": "B" * 300,
        "accelerators": ["nvidia-gpu"] * 4,
        "backends": ["tensorrt", "onnxruntime", "openvino", "llamacpp"] * 6,
        "precision": "fp16",
    }
    text = compact_summary(summary)
    assert len(text.encode()) <= 250
    assert json.loads(text)["acc"] == ["nvidia-gpu"] * 4


# -- secret, derived keys, settings ---------------------------------------


def test_created_secret_is_private_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "s" / "secret"
    made = create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = read_secret(path)
    assert again.ray_token("m") == made.ray_token("m")
    assert again.mdns_key("m") == made.mdns_key("m")
    with pytest.raises(ConfigError):
        create_secret(path)  # never replaced


def test_derived_values_are_independent_and_hidden(tmp_path: Path) -> None:
    s = MeshSecret(b"0123456789abcdef0123")
    token = s.ray_token("lab")
    assert len(token) == 64 and int(token, 16) >= 0
    assert token != s.ray_token("other")
    assert s.mdns_key("lab").hex() != token
    assert "0123456789abcdef" not in repr(s) and "0123456789abcdef" not in str(s)
    assert s.key_id() != MeshSecret(b"another-secret-0123").key_id()


def test_passphrase_files_and_bad_secrets(tmp_path: Path) -> None:
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery staple\n")
    phrase.chmod(0o644)
    s = read_secret(phrase)
    assert stat.S_IMODE(phrase.stat().st_mode) == 0o600  # tightened, since we own it
    assert s.ray_token("m") == MeshSecret(b"correct horse battery staple").ray_token("m")
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(AuthError):
        read_secret(short)
    with pytest.raises(AuthError) as err:
        read_secret(tmp_path / "missing")
    assert "copy the secret" in str(err.value)


def test_resolve_secret_creates_only_when_asked(tmp_path: Path) -> None:
    settings = JoinSettings(mesh="lab", state_dir=tmp_path / "st").resolved()
    with pytest.raises(AuthError):
        resolve_secret(settings, create=False)
    made, created = resolve_secret(settings, create=True)
    assert created and made.source == settings.paths.secret
    again, created = resolve_secret(settings, create=False)
    assert not created and again.key_id() == made.key_id()
    other = JoinSettings(mesh="lab", state_dir=tmp_path / "st", secret_file=tmp_path / "no")
    with pytest.raises(AuthError):
        resolve_secret(other.resolved(), create=True)


def test_settings_round_trip_and_state_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEMESH_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir("lab") == tmp_path / "xdg" / "edgemesh" / "lab"
    monkeypatch.setenv("EDGEMESH_STATE_DIR", str(tmp_path / "explicit"))
    assert default_state_dir("lab") == tmp_path / "explicit"
    settings = JoinSettings(mesh="lab", box_id="b1", interface="eth0", settle_s=1.5).resolved()
    settings.save()
    loaded = load_settings(settings.state_dir)
    assert loaded == settings
    assert "secret" not in settings.paths.settings.read_text().replace("secret_file", "")
    settings.paths.settings.write_text("{not json")
    with pytest.raises(ConfigError):
        load_settings(settings.state_dir)


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "-lead", "x" * 40, "dot.ted"])
def test_bad_mesh_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_mesh_name(bad)
    assert check_mesh_name("lab-2") == "lab-2"


def test_ray_temp_dirs_are_short_and_distinct(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 80)
    a = default_ray_temp_dir(deep / "box1")
    b = default_ray_temp_dir(deep / "box2")
    assert a != b
    # Ray's socket paths must stay under the 107-byte AF_UNIX limit.
    socket_path = a / "session_2026-01-01_00-00-00_000000_12345" / "sockets" / "plasma_store"
    assert len(str(socket_path)) < 107
    assert default_ray_temp_dir(Path("/s/b")) == Path("/s/b/ray")


def test_old_ray_sessions_are_pruned_newest_kept(tmp_path: Path) -> None:
    names = [f"session_2026-01-0{i}_00-00-00_000000_1" for i in range(1, 6)]
    for i, name in enumerate(names):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "raylet.out").write_text("x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "session_latest").symlink_to(tmp_path / names[-1])
    removed = prune_sessions(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == names[:2]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [*names[2:], "session_latest"]
    assert prune_sessions(tmp_path, keep=3) == []


# -- election ---------------------------------------------------------------


def test_no_head_waits_for_the_settle_window_then_the_oldest_leads() -> None:
    a, b = record("a", 100.0), record("b", 101.0)
    assert decide(a, [b], settled=False).action == WAIT
    assert decide(a, [b], settled=True).action == LEAD
    d = decide(b, [a], settled=True)
    assert d.action == WAIT and d.head == a


def test_simultaneous_start_breaks_the_tie_by_box_id() -> None:
    a, b = record("a", 100.0), record("b", 100.0)
    assert decide(a, [b], settled=True).action == LEAD
    assert decide(b, [a], settled=True).action == WAIT


def test_every_box_agrees_on_one_head_for_any_view() -> None:
    boxes = [record(f"b{i}", 100.0 + (i * 7) % 5) for i in range(6)]
    leaders = [
        me.box_id
        for me in boxes
        if decide(me, [p for p in boxes if p is not me], settled=True).action == LEAD
    ]
    assert leaders == [min(boxes, key=lambda r: r.key).box_id]


def test_a_box_follows_an_existing_head_even_if_older() -> None:
    old = record("old", 50.0)
    head = record("young", 200.0, role=HEAD)
    d = decide(old, [head], settled=False)
    assert d.action == FOLLOW and d.head == head


def test_two_heads_that_meet_keep_the_older_one() -> None:
    h1 = record("h1", 100.0, role=HEAD)
    h2 = record("h2", 90.0, role=HEAD)
    assert decide(h1, [h2], settled=True).action == FOLLOW
    assert decide(h2, [h1], settled=True).action == LEAD
    w = record("w", 80.0, role=WORKER)
    assert decide(w, [h1, h2], settled=True).head == h2


# -- membership -------------------------------------------------------------


def test_membership_events_join_head_leave_crash() -> None:
    m = Membership()
    seen = []
    unsubscribe = m.subscribe(seen.append)
    a = record("a", 100.0)
    m.upsert(a)
    m.upsert(a.evolve(role=HEAD, ready=True))
    b = record("b", 101.0)
    m.upsert(b)
    m.remove("b")
    m.upsert(replace(b, seq=5))
    m.crashed("b", 101.0, "Ray node died")
    kinds = [(e.kind, e.box_id) for e in seen]
    assert kinds == [
        (JOIN, "a"),
        (HEAD_CHANGE, "a"),
        (JOIN, "b"),
        (LEAVE, "b"),
        (JOIN, "b"),
        (CRASH, "b"),
    ]
    # The crashed run's cached record does not bring it back...
    m.upsert(replace(b, seq=5))
    assert m.get("b") is None
    # ...but its restart (a new incarnation) does.
    m.upsert(record("b", 150.0))
    assert m.get("b") is not None and seen[-1].kind == JOIN
    unsubscribe()
    m.remove("a")
    assert seen[-1].kind == JOIN  # no more events after unsubscribing
    assert [x["id"] for x in m.lost()] == ["b"]


def test_a_restart_without_goodbye_is_a_crash_of_the_old_run() -> None:
    m = Membership()
    events = []
    m.subscribe(events.append)
    m.upsert(record("a", 100.0))
    m.upsert(record("a", 200.0))
    assert [e.kind for e in events] == [JOIN, CRASH, JOIN]
    m.upsert(record("a", 100.0, seq=9))  # the old run's record, still cached
    assert m.get("a").record.started == 200.0


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    m = Membership()
    seen = []

    def broken(_ev: object) -> None:
        raise RuntimeError("consumer bug")

    m.subscribe(broken)
    m.subscribe(seen.append)
    m.upsert(record("a"))
    assert [e.kind for e in seen] == [JOIN]


def test_events_iterator_and_cross_process_log(tmp_path: Path) -> None:
    m = Membership()
    m.subscribe(EventLog(tmp_path / "events.jsonl"))
    got = []

    def consume() -> None:
        got.extend(m.events(timeout=2.0))

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    m.upsert(record("a"))
    m.remove("a")
    t.join()
    assert [e.kind for e in got] == [JOIN, LEAVE]
    replayed = list(follow(tmp_path, from_start=True, timeout=0.5, poll_s=0.05))
    assert [(e.kind, e.box_id) for e in replayed] == [(JOIN, "a"), (LEAVE, "a")]


# -- Ray command line ---------------------------------------------------------


def test_ray_spec_binds_the_mesh_address_and_labels_the_node(tmp_path: Path) -> None:
    res = box_resources("jetson-1", ["jetson-gpu", "jetson-gpu", "rockchip-npu"])
    assert res == {"box:jetson-1": 1.0, "accel:jetson-gpu": 1.0, "accel:rockchip-npu": 1.0}
    spec = RaySpec(
        head=True,
        node_ip="10.77.0.1",
        temp_dir=tmp_path / "ray",
        token_path=tmp_path / "ray_token",
        log_path=tmp_path / "log",
        resources=res,
        base_env={"PATH": "/bin"},
    )
    argv = spec.argv()
    assert argv[0] == sys.executable
    assert argv[argv.index("--node-ip-address") + 1] == "10.77.0.1"
    assert argv[argv.index("--temp-dir") + 1] == str(tmp_path / "ray")
    assert json.loads(argv[argv.index("--resources") + 1]) == res
    assert "--head" in argv and spec.address == "10.77.0.1:6379"
    env = spec.env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_token")
    assert env["RAY_TMPDIR"] == str(tmp_path / "ray")
    assert all(env[k] == v for k, v in HEALTH_ENV.items())
    worker = RaySpec(
        head=False,
        node_ip="10.77.0.2",
        temp_dir=tmp_path / "r2",
        token_path=tmp_path / "t",
        log_path=tmp_path / "l",
        head_address="10.77.0.1:6379",
    )
    wargv = worker.argv()
    assert "--head" not in wargv and wargv[wargv.index("--address") + 1] == "10.77.0.1:6379"


# -- status and the API other processes use -----------------------------------


def agent_doc(tmp_path: Path, **over) -> dict:
    fp = collect(SYSROOTS / "rpi5")
    head = record("a", 100.0, role=HEAD, ready=True, ray_address="10.0.0.1:6379")
    worker = record("b", 101.0, role=WORKER, ready=True, ray_address="10.0.0.1:6379")
    joining = record("c", 102.0, role=CANDIDATE, fp_digest=fp.digest(), summary=fp.summary())
    nodes = [
        {"node_id": "n-a", "address": "10.0.0.1", "alive": True, "is_head": True, "box": "a",
         "resources": {"CPU": 2.0, "box:a": 1.0}},
        {"node_id": "n-b-old", "address": "10.0.0.2", "alive": False, "is_head": False,
         "box": "b", "resources": {"CPU": 2.0, "box:b": 1.0}},
        {"node_id": "n-b", "address": "10.0.0.2", "alive": True, "is_head": False, "box": "b",
         "resources": {"CPU": 2.0, "box:b": 1.0}},
    ]  # fmt: skip
    doc = {
        "mesh": "lab",
        "box_id": "b",
        "pid": os.getpid(),
        "running": True,
        "updated": time.time(),
        "role": WORKER,
        "address": "10.0.0.2",
        "head": "a",
        "decision": {"action": "follow", "head": "a", "reason": "head found"},
        "ray": {
            "address": "10.0.0.1:6379",
            "node_ip": "10.0.0.2",
            "token_file": str(tmp_path / "ray_token"),
            "nodes": nodes,
        },
        "members": [
            {**head.to_dict(), "ray_alive": True},
            {**worker.to_dict(), "ray_alive": True},
            {**joining.to_dict(), "ray_alive": None},
        ],
        "lost": [],
        "rejected": [{"name": "x@lab", "reason": "signature", "detail": "", "address": "1.2.3.4"}],
    }
    doc.update(over)
    return doc


def test_status_from_an_agent_document(tmp_path: Path) -> None:
    st = from_agent(agent_doc(tmp_path))
    assert isinstance(st, MeshStatus) and st.head == "a" and st.box_id == "b"
    assert [(b.id, b.role, b.health) for b in st.boxes] == [
        ("a", HEAD, "ok"),
        ("b", WORKER, "ok"),
        ("c", CANDIDATE, "electing"),
    ]
    assert st.box("b").ray_node_id == "n-b"  # the alive node, not the dead one
    assert st.box("b").resources["box:b"] == 1.0
    assert st.box("c").ray_node_id is None and st.box("c").fingerprint["arch"] == "aarch64"
    assert st.box("b").is_self
    out = st.to_dict()
    assert json.loads(json.dumps(out))["boxes"][1]["ray_node_id"] == "n-b"
    table = render(st)
    assert "x@lab" in table and "electing" in table
    assert health({"role": WORKER, "ready": True, "ray_alive": False}) == "ray-down"
    assert health({"role": HEAD, "ready": False}) == "starting"


def test_read_status_and_ray_connection_need_a_live_agent(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path).ensure()
    with pytest.raises(BoxLostError):
        read_status(tmp_path)
    with pytest.raises(BoxLostError):
        ray_connection(tmp_path)
    write_json(paths.state, agent_doc(tmp_path))
    st = read_status(tmp_path)
    assert st.source == "agent" and len(st.boxes) == 3
    conn = ray_connection(tmp_path, mesh="lab")
    assert (conn.address, conn.node_ip, conn.box_id, conn.head_box) == (
        "10.0.0.1:6379",
        "10.0.0.2",
        "b",
        "a",
    )
    assert conn.env()["RAY_AUTH_MODE"] == "token"
    assert conn.env()["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_token")
    with pytest.raises(ConfigError):
        ray_connection(tmp_path, mesh="other")
    # A stale document (agent gone without cleaning up) is not trusted.
    write_json(paths.state, agent_doc(tmp_path, updated=time.time() - 3600))
    with pytest.raises(BoxLostError):
        read_status(tmp_path)
    # An agent still electing has no Ray address yet.
    doc = agent_doc(tmp_path)
    doc["ray"]["address"] = ""
    write_json(paths.state, doc)
    with pytest.raises(BoxLostError) as err:
        ray_connection(tmp_path)
    assert "not in a Ray cluster yet" in str(err.value)
