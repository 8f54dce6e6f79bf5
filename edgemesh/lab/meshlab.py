"""A real mesh on network-namespace boxes, driven the way a user drives it.

Shared by the mesh and memory benchmarks and ``examples/pi_jetson/lab.py``.
Each box is a ``NetnsLab`` namespace (optionally with cgroup CPU/memory
limits) running ``edgemesh join`` as its own process tree; plans and deploys
go through the real CLI (``edgemesh plan --json``, ``edgemesh deploy --plan``)
inside a box, and chats go to the mesh gateway over the lab's bridge (the
host is ``<subnet>.254``). Same flow as ``tests/test_router_netns.py``.

``MeshLab.close()`` pulls every plug and removes the namespaces and cgroups;
use it as a context manager.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgemesh.errors import BoxLostError, MeshError
from edgemesh.lab.netns import Box, NetnsLab
from edgemesh.reexec import edgemesh_argv

T = TypeVar("T")

if TYPE_CHECKING:
    from edgemesh.mesh import MemberEvent, MeshStatus

HOST = 254


class MeshBox:
    """One namespace box and its `edgemesh join` process tree."""

    def __init__(
        self,
        box: Box,
        secret: Path,
        mesh: str,
        box_id: str | None = None,
        *,
        default_flags: bool = False,
    ) -> None:
        self.box = box
        self.secret = secret
        self.mesh = mesh
        # default_flags: join as a user would, with no options but the mesh and its
        # secret: the default id, state folder (under the box's HOME) and interface.
        self.default_flags = default_flags
        self._id = "" if default_flags else box_id or f"box{box.index}"
        self.state = (
            box.dir / "home" / ".local" / "state" / "edgemesh" / mesh
            if default_flags
            else box.dir / "state"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        """The box id; with default flags, the one its agent derived and kept
        (``<state>/box_id``), or "" before the agent wrote it."""
        if not self._id and self.default_flags:
            try:
                self._id = json.loads((self.state / "box_id").read_text())["box_id"]
            except (OSError, ValueError, KeyError):
                return ""
        return self._id

    def join(self) -> None:
        argv = edgemesh_argv("join", "--mesh", self.mesh, "--secret-file", str(self.secret))
        if not self.default_flags:
            argv += ["--state-dir", str(self.state), "--box-id", self.id, "--interface", "eth0",
                     "--settle", "2"]  # fmt: skip
        self.proc = self.box.spawn(argv, env=self.box.env(), log=self.box.dir / "join.log")

    def leave(self) -> int | None:
        """SIGTERM the join process alone, as a service manager would: it says
        goodbye and must stop its own Ray node; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.box.kill(proc)
            proc.wait(timeout=10)
            return None

    def pull_plug(self) -> None:
        """SIGKILL every process of the box (its cable pulled)."""
        self.proc = None
        self.box.kill_all()

    def status(self) -> MeshStatus | None:
        """What this box's agent says of the mesh (None when it says nothing)."""
        from edgemesh.mesh import read_status

        try:
            return read_status(self.state)
        except BoxLostError:
            return None

    def events(self) -> list[MemberEvent]:
        from edgemesh.mesh import follow

        return list(follow(self.state, from_start=True, timeout=0, poll_s=0))

    def edgemesh(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return self.box.run(edgemesh_argv(*args), timeout=timeout)

    def log_tail(self, n: int = 3000) -> str:
        path = self.box.dir / "join.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"

    def memory_peak_bytes(self) -> int | None:
        """Peak memory use of the box's cgroup so far (None without a limit)."""
        cg = self.box.cgroup
        if cg is None:
            return None
        for d in cg.dirs:
            for name in ("memory.peak", "memory.max_usage_in_bytes"):
                try:
                    return int((d / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

    def anon_bytes(self) -> int | None:
        """Anonymous memory (process memory, not page cache) in the box's cgroup now."""
        cg = self.box.cgroup
        if cg is None:
            return None
        for d in cg.dirs:
            try:
                stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            for key in ("anon", "total_rss"):
                if key in stat:
                    return int(stat[key])
        return None

    def oom_kills(self) -> int | None:
        """OOM kills inside the box's cgroup (None when the kernel does not say)."""
        return None if self.box.cgroup is None else cgroup_oom_kills(self.box.cgroup)


def cgroup_oom_kills(cg: Any) -> int | None:
    """OOM kills inside a ``cgroups.Limits`` group, from cgroup v2's
    ``memory.events`` or v1's ``memory.oom_control`` (None when neither says)."""
    for d in cg.dirs:
        for name in ("memory.events", "memory.oom_control"):
            try:
                text = (d / name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return None


def formed(boxes: Sequence[MeshBox]) -> str | None:
    """The head's id once every box sees all of ``boxes`` with live Ray nodes."""
    want = sorted(b.id for b in boxes)
    heads = set()
    for b in boxes:
        st = b.status()
        if st is None:
            return None
        alive = sorted(n["box"] for n in st.ray_nodes if n["alive"])
        if sorted(x.id for x in st.boxes) != want or alive != want or st.head is None:
            return None
        heads.add(st.head)
    return heads.pop() if len(heads) == 1 else None


@dataclass
class BoxLimits:
    cpus: float | None = None
    memory_bytes: int | None = None


@dataclass
class MeshLab:
    """``n`` namespace boxes on ``<subnet>.0/24`` that will form mesh ``mesh``."""

    limits: Sequence[BoxLimits]
    subnet: str = "10.79.0"
    prefix: str = "emb"
    mesh: str = "benchlab"
    ids: Sequence[str] | None = None
    lab: NetnsLab = field(init=False)
    boxes: list[MeshBox] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        from edgemesh.mesh.config import create_secret

        self.lab = NetnsLab(0, subnet=self.subnet, host_address=HOST, prefix=self.prefix)
        try:
            for lim in self.limits:
                self.lab.add_box(cpus=lim.cpus, memory_bytes=lim.memory_bytes)
            secret = create_secret(self.lab.root / "mesh.secret").source
            if secret is None:
                raise MeshError("could not create the lab's mesh secret")
            ids = list(self.ids) if self.ids else [None] * len(self.lab.boxes)
            self.boxes = [
                MeshBox(b, secret, self.mesh, i) for b, i in zip(self.lab.boxes, ids, strict=True)
            ]
        except BaseException:
            self.lab.close()
            raise

    @property
    def root(self) -> Path:
        return self.lab.root

    def logs(self) -> str:
        return "\n".join(f"--- {b.id}\n{b.log_tail()}" for b in self.boxes)

    def formed(self, boxes: Sequence[MeshBox] | None = None) -> str | None:
        return formed(list(boxes or self.boxes))

    def box(self, box_id: str) -> MeshBox:
        return next(b for b in self.boxes if b.id == box_id)

    def write_profiles(
        self, name: str, boxes: Sequence[MeshBox], compute: dict[str, Any], memory: int
    ) -> Path:
        """Hand-written planner profiles (same figures for every box) -> a file."""
        path = self.root / f"{name}.json"
        profiles = [
            {
                "id": b.id,
                "memory_limit_bytes": memory,
                "backends": ["onnxruntime"],
                "compute": compute,
            }
            for b in boxes
        ]
        path.write_text(json.dumps(profiles))
        return path

    def plan(
        self, on: MeshBox, package: Path, profiles: Path, *extra: str
    ) -> tuple[int, dict[str, Any] | None, str]:
        """``edgemesh plan --json`` run on box ``on``: (exit code, plan or None, stderr)."""
        out = on.edgemesh(
            "plan", "--model", str(package), "--boxes", str(profiles), "--json", *extra
        )
        plan = json.loads(out.stdout) if out.returncode == 0 else None
        return out.returncode, plan, out.stderr

    def deploy(
        self, on: MeshBox, package: Path, name: str, profiles: Path, plan: dict[str, Any], port: int
    ) -> dict[str, Any]:
        """``edgemesh deploy PACKAGE --plan`` run on box ``on``; returns the record."""
        plan_file = self.root / f"plan-{name}-{len(plan['stages'])}.json"
        plan_file.write_text(json.dumps(plan))
        out = on.edgemesh(
            "deploy", str(package), "--name", name, "--state-dir", str(on.state),
            "--boxes", str(profiles), "--plan", str(plan_file), "--port", str(port), "--json",
            "--host", "mesh",
        )  # fmt: skip
        if out.returncode != 0:
            raise MeshError(f"edgemesh deploy failed:\n{out.stderr[-4000:]}\n{self.logs()}")
        record: dict[str, Any] = json.loads(out.stdout)
        return record

    def save_logs(self, dest: Path, max_bytes: int = 2 << 20) -> Path:
        """Copy the lab's text logs (agents, Ray, Serve, stage workers) to ``dest``,
        for a look after ``close()`` removed the lab."""
        import shutil

        for path in self.root.rglob("*"):
            if path.suffix in (".log", ".err", ".out") and path.is_file():
                if path.stat().st_size <= max_bytes and path.stat().st_size > 0:
                    target = dest / path.relative_to(self.root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
        return dest

    def close(self) -> None:
        for b in self.boxes:
            b.pull_plug()
        self.lab.close()

    def __enter__(self) -> MeshLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def equal_split(plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with its stages replaced by the planner's own equal-split baseline
    (one contiguous, equal share of layers per box), edited as ``edgemesh deploy
    --plan`` allows; used to force a stage count the cost model would not pick."""
    base = plan["baselines"]["equal"]
    stages = [
        {**s, "predicted_ms": base["bottleneck_ms"], "next_box": None} for s in base["stages"]
    ]
    for a, b in itertools.pairwise(stages):
        a["next_box"] = b["box"]
    return {**plan, "stages": stages, "bottleneck_ms": base["bottleneck_ms"], "left_out": []}


def wait_until(what: Callable[[], Any], timeout: float, why: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise MeshError(f"timed out after {timeout:.0f} s\n{why()}")
        time.sleep(0.25)


# -- talking to the gateway -------------------------------------------------


@dataclass
class Stream:
    """One streamed chat as the client saw it."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    started: float
    chunk_times: list[float]
    """``time.monotonic()`` of every chunk that carried text or a finish reason."""

    @property
    def first_token_s(self) -> float:
        return self.chunk_times[0] - self.started

    @property
    def ms_per_token(self) -> float:
        """Decode latency: first to last chunk over the tokens between them."""
        if self.completion_tokens < 2 or len(self.chunk_times) < 2:
            return float("nan")
        return 1000 * (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)

    def gaps_ms(self) -> list[float]:
        t = self.chunk_times
        return [1000 * (b - a) for a, b in itertools.pairwise(t)]


def stream_chat(
    base_url: str,
    model: str,
    text: str,
    max_tokens: int,
    *,
    on_chunk: Callable[[int], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    timeout: float = 600,
) -> Stream:
    """A greedy streamed chat through ``base_url`` (``.../v1``), timed per chunk."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    parts: list[str] = []
    times: list[float] = []
    reason = None
    tokens = 0
    started = time.monotonic()
    with httpx.Client(timeout=timeout) as http:
        with http.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise MeshError(f"the gateway answered {resp.status_code}: {resp.text[:500]}")
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise MeshError(f"the gateway reported an error mid-stream: {data['error']}")
                if data.get("usage"):
                    tokens = int(data["usage"]["completion_tokens"])
                for choice in data.get("choices", []):
                    delta = choice.get("delta", {})
                    piece = delta.get("content") or ""
                    if piece or choice.get("finish_reason"):
                        times.append(time.monotonic())
                        parts.append(piece)
                        reason = choice.get("finish_reason") or reason
                        if on_chunk is not None:
                            on_chunk(len(parts))
                        if on_text is not None and piece:
                            on_text(piece)
    return Stream("".join(parts), reason, tokens, started, times)


def run_parallel(jobs: Sequence[Callable[[], T]], timeout_s: float) -> list[T]:
    """Run every job at once, one thread each; results in order. Re-raises the
    first failure, and raises MeshError for a job still running after ``timeout_s``."""
    results: list[Any] = [None] * len(jobs)
    finished = [False] * len(jobs)

    def one(i: int) -> None:
        try:
            results[i] = jobs[i]()
            finished[i] = True
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    for result, done in zip(results, finished, strict=True):
        if isinstance(result, BaseException):
            raise result
        if not done:
            raise MeshError(f"a job did not finish within {timeout_s:g} s")
    return results


def run_chats(
    base_url: str,
    model: str,
    texts: Sequence[str],
    max_tokens: int,
    on_chunk: Callable[[int, int], None] | None = None,
) -> list[Stream]:
    """Stream every chat at once, one thread each; re-raises the first failure."""

    def job(i: int) -> Callable[[], Stream]:
        hook = (lambda n: on_chunk(i, n)) if on_chunk else None
        return lambda: stream_chat(base_url, model, texts[i], max_tokens, on_chunk=hook)

    return run_parallel([job(i) for i in range(len(texts))], timeout_s=900)


def metrics(base_url: str, model: str) -> dict[str, Any]:
    import httpx

    # /metrics is Prometheus text since issue 16; the JSON counters moved to /metrics/json.
    counters: dict[str, Any] = httpx.get(
        base_url.removesuffix("/v1") + "/metrics/json", timeout=30
    ).json()[model]
    return counters


def load_1m() -> float:
    import os

    return round(os.getloadavg()[0], 2)
