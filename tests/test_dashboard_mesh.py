"""The dashboard of a mesh, in a real headless browser: two network-namespace
boxes, each running `edgemesh join`.

1. the boxes form a mesh; the head runs `edgemesh deploy` of the tiny
   package over both (`--host mesh`, so the test reaches the gateway over
   the lab's bridge);
2. the page lists BOTH boxes (not only the head), each with live CPU and
   memory read on that box, and the model's stages on each;
3. "Add a box" shows the join command with the mesh name and where the
   secret file is, never the secret itself;
4. a second model is planned and deployed from the page and answers;
5. the worker box is unplugged (every process SIGKILLed): the page shows it
   lost; the next request re-plans onto the head, and the event log has the
   loss and the recovery; "Forget" removes the lost box from the page.

Subnet 10.82.0 and prefix "ehb" are this module's own. Needs root,
iproute2, the mesh extra, playwright and Debian's chromium; skipped with
the reason otherwise. Everything is removed in finally.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgemesh.lab.meshlab import MeshBox, formed, wait_until
from edgemesh.lab.netns import NetnsLab
from edgemesh.lab.netns import skip_reason as netns_skip_reason
from tests.fixtures.browser import browser_page, screenshot
from tests.fixtures.browser import skip_reason as browser_skip_reason
from tests.fixtures.tiny_models import shared_tiny_package

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_why = netns_skip_reason() or browser_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip("ray", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("zeroconf", reason="needs the mesh extra: pip install 'edgemesh[mesh]'")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'edgemesh[onnx]'")
openai = pytest.importorskip("openai", reason="the test speaks through the OpenAI client")

MESH = "dashlab"
SUBNET = "10.82.0"
HOST = 254
PORT = 8000
TIMEOUT_S = 180.0
# Slow compute and plenty of memory: the planner spreads the layers over both boxes.
COMPUTE = {"onnxruntime/fp32": {"gflops": 0.01, "bandwidth_gbps": 0.5}}


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    lab = NetnsLab(2, subnet=SUBNET, host_address=HOST, prefix="ehb")
    try:
        yield lab
    finally:
        lab.close()


def test_mesh_dashboard_lists_every_box_deploys_and_shows_a_lost_box(
    lab: NetnsLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemesh.mesh.config import create_secret

    package = shared_tiny_package("llama")
    # The boxes' agents (and so their Ray tasks) search this folder for packages.
    monkeypatch.setenv("EDGEMESH_PACKAGES", str(package.parent))
    secret = create_secret(lab.root / "mesh.secret").source
    assert secret is not None
    boxes = [MeshBox(b, secret, MESH) for b in lab.boxes]

    def logs() -> str:
        return "\n".join(f"--- {b.box.name} ({b.id})\n{b.log_tail()}" for b in boxes)

    shots = tmp_path / "screenshots"
    try:
        for b in boxes:
            b.join()
        head_id = wait_until(lambda: formed(boxes), TIMEOUT_S, logs)
        head = next(b for b in boxes if b.id == head_id)
        worker = next(b for b in boxes if b.id != head_id)
        profiles = lab.root / "profiles.json"
        profiles.write_text(json.dumps([
            {"id": b.id, "memory_limit_bytes": 1 << 30, "backends": ["onnxruntime"],
             "compute": COMPUTE}
            for b in boxes
        ]))  # fmt: skip
        out = head.edgemesh(
            "deploy", str(package), "--name", "tiny", "--state-dir", str(head.state),
            "--boxes", str(profiles), "--port", str(PORT), "--host", "mesh", "--json",
            timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:] + logs()
        record = json.loads(out.stdout)
        assert {s["box"] for s in record["stages"]} == {head.id, worker.id}
        base = record["gateway"].removesuffix("/v1")

        with browser_page() as page:
            page.goto(base + "/dashboard")
            # -- both boxes, live figures read on each ------------------------
            for b in boxes:
                row = page.locator(f"tr.box-row[data-box='{b.id}']")
                row.locator("td.health", has_text="ok").wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('tr.box-row td.cpu')]"
                ".filter(td => /\\d %/.test(td.textContent)).length == 2",
                timeout=60_000,
            )
            for b in boxes:
                row = page.locator(f"tr.box-row[data-box='{b.id}']")
                assert "GiB" in row.locator("td.memory").inner_text()
                assert "onnxruntime" in row.locator("td.engines").inner_text()
                assert "tiny" in row.inner_text()  # a stage of the model runs there
            page.click("#add-box")
            join = page.inner_text("#join-command")
            assert f"edgemesh join --mesh {MESH} --secret-file" in join
            secret_text = Path(secret).read_text().strip()
            assert secret_text not in page.content()  # the secret itself never
            screenshot(page, shots, "mesh-devices")

            # -- a second model, from the page -------------------------------
            page.click("#tabs button[data-view=models]")
            row = page.locator(f"tr[data-package='{package}']").first
            row.wait_for(timeout=60_000)
            row.locator("button[data-act=plan]").click()
            page.wait_for_selector("#plan table.plan-stages", timeout=120_000)
            planned = page.locator("#plan table.plan-stages tbody tr")
            assert planned.count() == 2  # over both boxes
            page.fill("#deploy-name", "tiny2")
            page.click("#deploy-go")
            page.wait_for_selector("#job.done, #job.failed", timeout=300_000)
            job = page.inner_text("#job")
            assert "done" in job, job

            def served() -> bool:
                r = httpx.get(base + "/api/models", timeout=30)
                assert r.status_code == 200, r.text
                return "tiny2" in {m["name"] for m in r.json()["models"]}

            wait_until(served, 60, lambda: httpx.get(base + "/api/models", timeout=30).text)
            page.locator(".model[data-model=tiny2] .shardmap div").nth(1).wait_for()
            client = openai.OpenAI(base_url=record["gateway"], api_key="unused", timeout=300)
            out2 = client.completions.create(model="tiny2", prompt="hello", max_tokens=6)
            assert out2.usage.completion_tokens == 6
            assert {m.id for m in client.models.list().data} >= {"tiny", "tiny2"}
            screenshot(page, shots, "mesh-models")

            # -- a box lost --------------------------------------------------
            worker.pull_plug()
            page.click("#tabs button[data-view=devices]")
            lost = page.locator(f"tr.box-row.lost[data-box='{worker.id}']")
            lost.wait_for(timeout=120_000)
            assert "lost" in lost.inner_text()
            screenshot(page, shots, "mesh-lost")
            # the next request re-plans "tiny" onto the head, and the log says so
            out3 = client.completions.create(model="tiny", prompt="hello", max_tokens=6)
            assert out3.usage.completion_tokens == 6
            page.click("#tabs button[data-view=events]")
            page.locator("#events tr[data-kind=lost]").first.wait_for(timeout=30_000)
            page.locator("#events tr[data-kind=recover]").first.wait_for(timeout=60_000)
            assert worker.id in page.inner_text("#events")
            screenshot(page, shots, "mesh-events")

            # -- forget the lost box -----------------------------------------
            page.click("#tabs button[data-view=devices]")
            page.on("dialog", lambda d: d.accept())
            lost.locator("button[data-act=remove]").click()
            page.wait_for_selector("#job.done >> text=remove", timeout=60_000)
            page.wait_for_function(
                f"() => !document.querySelector(\"tr.lost[data-box='{worker.id}']\")"
            )
        events = httpx.get(base + "/api/events", timeout=30).json()["events"]
        kinds = {e["kind"] for e in events}
        assert {"join", "lost", "deploy", "recover", "remove"} <= kinds, kinds
        deployed = {e["model"] for e in events if e["kind"] == "deploy"}
        assert deployed == {"tiny", "tiny2"}  # the shell's deploy too, not only the page's
    finally:
        for b in boxes:
            b.pull_plug()
