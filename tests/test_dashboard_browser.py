"""The dashboard in a real headless browser, on a real `edgemesh serve`.

One story on one box (a user's first day):

1. `edgemesh serve --api-key KEY` with the default model (GGUF on llama.cpp);
   the page asks for the key before it shows anything, and every /api call
   without it is refused server-side;
2. Devices lists the box with live CPU and memory, llama.cpp among its
   engines and the model it runs; "Add a box" shows the join command;
3. Models lists the tiny package (built by the test), "Plan…" shows the
   real planner's plan (stages, precision, predicted tokens/s), "Deploy"
   serves it: the shard map appears and the OpenAI client gets answers;
4. Monitoring draws the charts from the sampled history after traffic;
5. Events lists the deploy; "Undeploy" stops serving the model.

Screenshots of each view go to the test's tmp folder (and to
$EDGEMESH_SCREENSHOTS for docs/img). Needs playwright and Debian's
chromium; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.fixtures.browser import browser_page, screenshot, skip_reason
from tests.fixtures.tiny_models import shared_tiny_package

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

_why = skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)
pytest.importorskip(
    "llama_cpp", reason="the default model runs on llama.cpp: pip install 'edgemesh[llamacpp]'"
)
pytest.importorskip(
    "onnxruntime", reason="the tiny package runs on an ONNX backend: pip install 'edgemesh[onnx]'"
)
openai = pytest.importorskip("openai", reason="the test speaks through the OpenAI client")

KEY = "dashboard-test-key"


def wait_for(what, timeout: float, why) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {why()}")
        time.sleep(0.25)


@pytest.fixture
def packages(tmp_path: Path) -> Path:
    """A packages folder holding a copy of the tiny package, as a user keeps one."""
    import shutil

    folder = tmp_path / "packages"
    shutil.copytree(shared_tiny_package("llama"), folder / "tiny-llama")
    return folder


@pytest.fixture
def server(tmp_path: Path, packages: Path, default_gguf: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    env = {**os.environ, "EDGEMESH_PACKAGES": str(packages)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemesh", "serve", "--port", str(port), "--api-key", KEY],
        cwd=tmp_path,  # not the checkout's root: its edgemesh/ lacks the mapped subpackages
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError("edgemesh serve exited:\n" + (tmp_path / "serve.log").read_text())
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 180, lambda: (tmp_path / "serve.log").read_text()[-2000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_the_api_refuses_every_action_without_the_key(server: str) -> None:
    for method, path in [
        ("GET", "/api/boxes"),
        ("GET", "/api/events"),
        ("POST", "/api/models"),
        ("DELETE", "/api/models/gemma-3-270m"),
        ("GET", "/dashboard/state"),
    ]:
        r = httpx.request(method, server + path, json={}, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        bad = httpx.request(
            method, server + path, json={}, timeout=10, headers={"Authorization": "Bearer wrong"}
        )
        assert bad.status_code == 401
    # The page itself and its static files carry no data: open.
    assert httpx.get(server + "/dashboard", timeout=10).status_code == 200
    assert httpx.get(server + "/dashboard/static/dashboard.js", timeout=10).status_code == 200


def test_a_day_on_the_dashboard(server: str, tmp_path: Path, packages: Path) -> None:
    shots = tmp_path / "screenshots"
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    with browser_page() as page:
        page.on("dialog", lambda d: d.accept())  # the confirm() before undeploy
        page.goto(server + "/dashboard")

        # 1. the key, asked for before anything is shown
        page.wait_for_selector("#login[open]")
        page.fill("#login-key", KEY)
        page.click("#login-ok")

        # 2. devices
        row = page.locator("tr.box-row").first
        row.locator("td.health", has_text="ok").wait_for()
        page.wait_for_function(
            "() => /\\d+(\\.\\d)? %/.test(document.querySelector('tr.box-row td.cpu').textContent)"
        )
        assert "GiB" in row.locator("td.memory").inner_text()
        assert "llamacpp" in row.locator("td.engines").inner_text()
        assert "gemma-3-270m" in row.inner_text()  # the model it runs, with its stage
        page.click("#add-box")
        page.wait_for_selector("#join-command")
        assert "edgemesh join --mesh" in page.inner_text("#join-command")
        screenshot(page, shots, "devices")

        # 3. plan, then deploy, the tiny package
        page.click("#tabs button[data-view=models]")
        pkg_row = page.locator("tr[data-package$='tiny-llama']")
        pkg_row.wait_for()
        pkg_row.locator("button[data-act=plan]").click()
        page.wait_for_selector("#plan table.plan-stages")
        stages = page.locator("#plan table.plan-stages tbody tr")
        assert stages.count() == 1  # one box, one stage
        assert "[0, 4)" in stages.first.inner_text()
        predicted = float(page.inner_text("#plan .predicted").split()[0])
        assert predicted > 0
        screenshot(page, shots, "plan")
        page.fill("#deploy-name", "tiny")
        page.click("#deploy-go")
        page.wait_for_selector("#job.done", timeout=120_000)
        page.locator(".model[data-model=tiny] .shardmap div").first.wait_for()

        # ... and it serves
        ids = [m.id for m in client.models.list().data]
        assert "tiny" in ids
        for _ in range(3):
            out = client.completions.create(model="tiny", prompt="hello", max_tokens=12)
            assert out.usage.completion_tokens == 12
        chat = client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "Say hi"}], max_tokens=24
        )
        assert chat.choices[0].message.content
        screenshot(page, shots, "models")

        # 4. monitoring: a sampled point with the tokens just generated
        page.click("#tabs button[data-view=monitoring]")
        headers = {"Authorization": f"Bearer {KEY}"}

        def served_tokens() -> bool:
            mon = httpx.get(server + "/api/monitor", headers=headers, timeout=10).json()
            return any(p["tokens_per_s"] > 0 for pts in mon["models"].values() for p in pts)

        wait_for(served_tokens, 30, lambda: "no point with tokens/s > 0")
        page.wait_for_selector("#charts canvas")
        assert page.locator("#charts h2", has_text="tiny").count() == 1
        time.sleep(2.5)  # one more poll, so the charts hold the new points
        screenshot(page, shots, "monitoring")

        # 5. events, then undeploy from the page
        page.click("#tabs button[data-view=events]")
        page.locator("#events tr[data-kind=deploy]").first.wait_for()
        screenshot(page, shots, "events")
        page.click("#tabs button[data-view=models]")
        page.click(".model[data-model=tiny] button[data-act=undeploy]")
        page.wait_for_selector("#job.done >> text=undeploy")
        page.wait_for_function("() => !document.querySelector('.model[data-model=tiny]')")
    assert "tiny" not in [m.id for m in client.models.list().data]
    kinds = [
        e["kind"]
        for e in httpx.get(server + "/api/events", headers=headers, timeout=10).json()["events"]
    ]
    assert "deploy" in kinds and "undeploy" in kinds
