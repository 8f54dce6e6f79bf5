"""The router on three network-namespace boxes, each running `edgemesh join`.

One story, because every Ray node costs seconds of a 2-core host:

1. three boxes join one mesh; a worker box runs `edgemesh deploy` of the
   tiny Qwen3 package with a 3-stage plan (`edgemesh plan --json`, one
   layer per box) from its own copy of the package;
2. greedy output through the mesh gateway (Ray Serve on the head) is token
   for token the single-box output, and 16 concurrent streamed chats all
   complete correctly; `/metrics` shows which box ran each stage;
3. a non-head box is unplugged (its whole process tree SIGKILLed) while
   streams are running: every stream still completes with the full,
   correct answer (re-plan over two boxes + replay), and `/metrics` shows
   the stages moved;
4. the box comes back (`edgemesh join` again): the gateway re-plans onto it
   because the plan improves by more than the margin, and answers stay exact;
5. the head's box is unplugged: the survivors elect a new head, whose agent
   re-deploys the recorded model (`edgemesh deploy --restore`), and the
   gateway on the new head answers exactly again.

The test process talks to the gateway over the lab's bridge (host address
.254). Subnet 10.78.0.0/24 and prefix "emr" keep it apart from the mesh
tests' lab. Everything (processes, namespaces, Ray) is removed in finally.
Needs root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgemesh.lab.meshlab import MeshBox, formed, run_parallel, wait_until
from edgemesh.lab.netns import NetnsLab, skip_reason
from tests.fixtures.tiny_models import shared_tiny_package

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")
openai = pytest.importorskip("openai", reason="the test speaks through the OpenAI client")

MESH = "routerlab"
SUBNET = "10.78.0"  # not the mesh tests' 10.77.0: both labs can exist at once
HOST = 254
PORT = 8000
FORM_TIMEOUT_S = 120.0
CHAT_TOKENS = 20
LONG_TOKENS = 160  # long enough that a box can be unplugged mid-stream
# Slow compute and plenty of memory: the planner spreads the 3 layers over 3
# boxes, squeezes them onto 2 after a loss, and spreads them again on return.
COMPUTE = {"onnxruntime/fp32": {"gflops": 0.01, "bandwidth_gbps": 0.5}}


def reference(package: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids of each prompt from one in-process pipeline (a single box)."""
    from edgemesh.offline import generate
    from edgemesh.sharding.pipeline import load_pipeline

    pipe = load_pipeline(package)
    try:
        return [generate(pipe, p, max_tokens=max_tokens).token_ids for p in prompts]
    finally:
        pipe.close()


def stream_chat(
    client: object, model: str, text: str, max_tokens: int, on_chunk=None
) -> tuple[str, str | None]:
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model=model,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    parts, reason = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        parts.append(chunk.choices[0].delta.content or "")
        reason = chunk.choices[0].finish_reason or reason
        if on_chunk is not None:
            on_chunk(len(parts))
    return "".join(parts), reason


def run_chats(
    client: object, model: str, texts: list[str], max_tokens: int, on_chunk=None
) -> list[tuple[str, str | None]]:
    """Stream every chat at once, one thread each; re-raises the first failure."""

    def job(i: int):
        hook = (lambda n: on_chunk(i, n)) if on_chunk else None
        return lambda: stream_chat(client, model, texts[i], max_tokens, hook)

    return run_parallel([job(i) for i in range(len(texts))], timeout_s=600)


def _restore_log(box: MeshBox) -> str:
    path = box.state / "restore.log"
    return "\n--- restore.log\n" + (path.read_text()[-3000:] if path.exists() else "(none)")


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(3, subnet=SUBNET, host_address=HOST, prefix="emr")
    try:
        yield lab
    finally:
        lab.close()


def test_three_boxes_serve_one_model_and_survive_losing_one(lab: NetnsLab) -> None:
    from edgemesh.mesh.config import create_secret
    from edgemesh.sharding.package.folder import open_package

    package = shared_tiny_package("qwen3")
    tokenizer = open_package(package).tokenizer()
    secret = create_secret(lab.root / "mesh.secret").source
    assert secret is not None
    boxes = [MeshBox(b, secret, MESH) for b in lab.boxes]

    def logs() -> str:
        return "\n".join(f"--- {b.id}\n{b.log_tail()}" for b in boxes)

    figures: dict[str, float] = {}
    try:
        # -- 1. three boxes, one mesh; a worker deploys a 3-stage plan -------
        t0 = time.monotonic()
        for b in boxes:
            b.join()
        head_id = wait_until(lambda: formed(boxes), FORM_TIMEOUT_S, logs)
        figures["form_s"] = time.monotonic() - t0
        head = next(b for b in boxes if b.id == head_id)
        deployer, victim = [b for b in boxes if b is not head]

        own_copy = deployer.box.dir / "tiny-qwen3"  # the deployer's own copy
        shutil.copytree(package, own_copy)
        profiles = lab.root / "profiles.json"
        profiles.write_text(
            json.dumps(
                [
                    {
                        "id": b.id,
                        "memory_limit_bytes": 1 << 30,
                        "backends": ["onnxruntime"],
                        "compute": COMPUTE,
                    }
                    for b in boxes
                ]
            )
        )
        out = deployer.edgemesh(
            "plan", "--model", str(own_copy), "--boxes", str(profiles), "--json",
            "--context", "256", "--sequences", "16", timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        plan_file = lab.root / "plan.json"
        plan_file.write_text(out.stdout)
        planned = json.loads(out.stdout)["stages"]
        assert sorted(s["box"] for s in planned) == ["box1", "box2", "box3"]

        t = time.monotonic()
        out = deployer.edgemesh(
            "deploy", str(own_copy), "--name", "tiny", "--state-dir", str(deployer.state),
            "--boxes", str(profiles), "--plan", str(plan_file), "--port", str(PORT), "--json",
            "--host", "mesh", timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        figures["deploy_s"] = time.monotonic() - t
        record = json.loads(out.stdout)
        assert record["gateway"] == f"http://{head.box.address}:{PORT}/v1"
        assert [s["box"] for s in record["stages"]] == [s["box"] for s in planned]

        # `edgemesh status --json` on the deploying box shows the gateway and stages.
        out = deployer.edgemesh("status", "--json", "--state-dir", str(deployer.state), timeout=300)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        assert st["gateway"] == record["gateway"]
        assert st["models"]["tiny"]["stages"] == record["stages"]

        # -- 2. exact output, 16 concurrent streamed chats, metrics -----------
        client = openai.OpenAI(base_url=record["gateway"], api_key="unused", timeout=300)
        http = httpx.Client(timeout=60)
        metrics_url = record["gateway"].removesuffix("/v1") + "/metrics/json"

        def stages_now() -> list[dict]:
            return http.get(metrics_url).json()["tiny"]["info"]["stages"]

        ran = stages_now()
        assert [s["box"] for s in ran] == [s["box"] for s in planned]
        assert [s["layers"] for s in ran] == [s["layers"] for s in planned]
        # Only the deploying box had the package; the others fetched theirs.
        assert [s["fetched"] for s in ran] == [s["box"] != deployer.id for s in ran]

        prompt = tokenizer.encode("The three boxes")
        [want] = reference(package, [prompt], CHAT_TOKENS)
        got = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=CHAT_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert got.usage.completion_tokens == CHAT_TOKENS
        assert got.choices[0].text == tokenizer.decode(want)

        texts = [f"Question {i}: what is {i} + {i}?" for i in range(16)]
        chats = [tokenizer.encode_chat([{"role": "user", "content": x}]) for x in texts]
        wants = [tokenizer.decode(ids) for ids in reference(package, chats, CHAT_TOKENS)]
        t = time.monotonic()
        results = run_chats(client, "tiny", texts, CHAT_TOKENS)
        figures["16_chats_s"] = time.monotonic() - t
        assert [r[0] for r in results] == wants
        assert all(r[1] == "length" for r in results)

        # -- 3. unplug a non-head box mid-stream ------------------------------
        long_texts = texts[:6]
        long_wants = [tokenizer.decode(ids) for ids in reference(package, chats[:6], LONG_TOKENS)]
        killed = threading.Event()
        chunks_at_kill: list[int] = []
        progress = [0] * len(long_texts)

        def on_chunk(i: int, n: int) -> None:
            progress[i] = n
            if i == 0 and n == 8 and not killed.is_set():
                killed.set()
                chunks_at_kill.extend(progress)
                victim.pull_plug()

        t = time.monotonic()
        results = run_chats(client, "tiny", long_texts, LONG_TOKENS, on_chunk)
        figures["streams_with_loss_s"] = time.monotonic() - t
        assert killed.is_set() and min(chunks_at_kill) < LONG_TOKENS  # truly mid-stream
        assert [r[0] for r in results] == long_wants
        assert all(r[1] == "length" for r in results)
        moved = http.get(metrics_url).json()["tiny"]["info"]
        assert moved["recoveries"] == 1
        assert victim.id not in {s["box"] for s in moved["stages"]}
        cuts = [x for s in moved["stages"] for x in s["layers"]]
        assert cuts[0] == 0 and cuts[-1] == 3 and cuts == sorted(cuts)  # contiguous, whole

        # -- 4. the box comes back and the gateway re-plans onto it -----------
        t = time.monotonic()
        victim.join()
        wait_until(lambda: formed(boxes), FORM_TIMEOUT_S, logs)
        wait_until(lambda: victim.id in {s["box"] for s in stages_now()}, FORM_TIMEOUT_S, logs)
        figures["rejoin_to_replanned_s"] = time.monotonic() - t
        back = stages_now()
        assert sorted(s["box"] for s in back) == ["box1", "box2", "box3"]
        results = run_chats(client, "tiny", texts[:4], CHAT_TOKENS)
        assert [r[0] for r in results] == wants[:4]

        # -- 5. the head's box dies: the new head's agent restores the gateway
        t = time.monotonic()
        head.pull_plug()
        survivors = [deployer, victim]
        new_head_id = wait_until(lambda: formed(survivors), FORM_TIMEOUT_S, logs)
        new_head = next(b for b in survivors if b.id == new_head_id)
        new_url = f"http://{new_head.box.address}:{PORT}"

        def gateway_back() -> bool:
            try:
                return http.get(new_url + "/v1/models", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(gateway_back, 180, lambda: logs() + _restore_log(new_head))
        figures["head_loss_to_gateway_s"] = time.monotonic() - t
        client = openai.OpenAI(base_url=new_url + "/v1", api_key="unused", timeout=300)
        results = run_chats(client, "tiny", texts[:4], CHAT_TOKENS)
        assert [r[0] for r in results] == wants[:4]
        ran = http.get(new_url + "/metrics/json").json()["tiny"]["info"]["stages"]
        assert {s["box"] for s in ran} <= {deployer.id, victim.id}
    finally:
        shown = ", ".join(f"{k}={v:.1f}" for k, v in figures.items())
        print(f"\nrouter figures (this host): {shown}")
        for b in boxes:
            b.pull_plug()
