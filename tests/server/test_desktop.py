"""The web desktop end to end in headless Chromium (Debian's chromium driven by Playwright): sign in, a streamed
chat reply, a process appearing in the table, kill and its KV blocks coming back; a user sees only their own
processes; a wrong key shows an error. Also the page's own endpoints (static files, model residency).

LLMOS_SCREENSHOTS=1 writes docs/img/desktop-{signin,chat,processes,kvmap}.png."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from llmos.fs.users import UserStore
from llmos.kernel.kernel import KernelConfig


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


start_server = _server_conftest().start_server

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"
STEP_DELAY_S = 0.03  # per kernel step: the tiny model would finish a 200-token generation before a click lands

# 2 MiB of KV: a map of a few hundred cells; a small token budget per step.
KERNEL = dict(kv_memory="2MiB", swap_memory="1MiB", policy="fair", max_num_batched_tokens=64)

# What the page counts as "used by a process": every cell that is neither free nor cached.
USED_CELLS = """() => [...document.querySelectorAll('#kv-grid .cell')]
    .filter(c => c.dataset.owner && c.dataset.owner !== 'free' && c.dataset.owner !== 'cached').length"""


def screenshot(target, name: str) -> None:
    if os.environ.get("LLMOS_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        target.screenshot(path=str(SHOTS / f"desktop-{name}.png"))


def slow_down(server) -> None:
    """Make every kernel step of the served model take STEP_DELAY_S longer and let no generation end before
    its max_tokens (the random tiny model may sample its EOS token), so that generations last seconds."""
    r = server.state.models.get(server.settings.preload[0])
    r.kernel.eos_token_ids = set()
    step = r.kernel.step

    def slow_step():
        time.sleep(STEP_DELAY_S)
        return step()

    r.kernel.step = slow_step


def spawn(server, prompt: str, max_tokens: int, key: str | None = None) -> int:
    """A generation through the native API (POST /v1/processes); returns its pid."""
    r = httpx.post(server.url + "/v1/processes", headers={"Authorization": f"Bearer {key}"} if key else {},
                   json={"model": server.settings.preload[0], "prompt": prompt, "max_tokens": max_tokens})
    assert r.status_code == 201, r.text
    return r.json()["pid"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the desktop tests drive Debian's Chromium at {CHROMIUM}, which is missing: "
                    "`apt-get install chromium`.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the desktop tests need Playwright for Python: `pip install playwright` "
                    "(no browser download needed; they use /usr/bin/chromium).")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


@pytest.fixture(scope="module")
def desk(tiny_model_dir, llmos_home):
    """A single-user daemon with a small KV pool and a slowed-down kernel."""
    s = start_server(tiny_model_dir, kernel=KernelConfig(**KERNEL))
    slow_down(s)
    yield s
    s.stop()


def test_static_files_and_model_endpoints(desk):
    r = httpx.get(desk.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text, "the page works offline: no external URLs"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{desk.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://", r.text), f"{name} loads nothing from outside"
    for bad in ("nope.js", "..%2Fdesktop.py", "%2E%2E/app.py"):
        r = httpx.get(f"{desk.url}/static/{bad}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"

    model = desk.settings.preload[0]
    body = httpx.get(desk.url + "/v1/residency").json()
    assert [m["name"] for m in body["data"]] == [model] and model in body["available"]
    r = httpx.post(f"{desk.url}/v1/models/{model}/pin")  # no body: pin
    assert r.status_code == 200 and r.json()["pinned"] is True and r.json()["expires_in_s"] is None
    r = httpx.post(f"{desk.url}/v1/models/{model}/pin", json={"pinned": False})
    assert r.json()["pinned"] is False
    assert httpx.post(desk.url + "/v1/models/no-such-model/load").status_code == 404
    assert httpx.post(desk.url + "/v1/models/no-such-model/unload").status_code == 404
    assert httpx.get(desk.url + "/v1/whoami").json() == {"name": "local", "role": "admin", "single_user": True}


def test_chat_streams_and_kill_returns_blocks(desk, browser):
    model = desk.settings.preload[0]
    num_blocks = desk.state.models.get(model).kernel.block_manager.num_blocks
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    console = Console(page)
    from playwright.sync_api import expect

    page.goto(desk.url + "/")
    expect(page.locator("#mode")).to_have_text("single-user mode")
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#kv-grid .cell")).to_have_count(num_blocks)

    # Chat: the reply streams in (its text is seen at several lengths before the stream ends).
    page.get_by_label("Message").fill("Hello, who are you?")
    page.get_by_role("button", name="Send").click()
    reply = page.locator(".msg.assistant .text").last
    expect(reply).to_be_attached()
    lengths, deadline = set(), time.monotonic() + 30
    while time.monotonic() < deadline:
        streaming = page.locator(".msg.streaming").count() > 0
        lengths.add(len(reply.text_content() or ""))
        if not streaming:
            break
        time.sleep(0.05)
    assert page.locator(".msg.streaming").count() == 0, "the stream did not end"
    assert (reply.text_content() or "").strip(), "the reply is empty"
    assert len(lengths - {0}) >= 2, f"the reply did not grow while streaming (lengths seen: {sorted(lengths)})"
    assert page.locator(".msg.error").count() == 0

    # A process suspended from the table moves its blocks to host swap.
    page.wait_for_timeout(1200)  # a map refresh after the chat's process ended
    baseline = page.evaluate(USED_CELLS)
    neighbour = spawn(desk, "In the beginning God created the heaven and the earth. " * 4, 200)
    neighbour_row = page.locator(f'#proc-rows tr[data-pid="{neighbour}"]')
    expect(neighbour_row.locator("td.state")).to_have_text(re.compile("running|ready"))
    page.wait_for_function(f"({USED_CELLS})() > {baseline}")
    page.get_by_role("button", name=f"Suspend process {neighbour}").click()
    expect(neighbour_row.locator("td.state")).to_have_text("suspended")
    expect(page.locator("#kv-swap .cell.used")).not_to_have_count(0)
    page.wait_for_function(f"({USED_CELLS})() === {baseline}")

    # A long generation appears in the table and on the KV map.
    pid = spawn(desk, "And the earth was without form", 220)
    row = page.locator(f'#proc-rows tr[data-pid="{pid}"]')
    expect(row).to_be_visible()
    expect(row.locator("td.state")).to_have_text(re.compile("running|ready"))
    page.wait_for_function(f"({USED_CELLS})() >= {baseline} + 3")  # a few blocks into its output
    expect(page.locator("#kv-legend")).to_contain_text(f"pid {pid}")
    screenshot(page, "chat")
    screenshot(page.locator("#processes"), "processes")
    screenshot(page.locator("#kv"), "kvmap")

    # Kill it: its row says killed and its blocks go back (the used cells return to the baseline).
    page.get_by_role("button", name=f"Kill process {pid}").click()
    expect(row.locator("td.state")).to_have_text("killed")
    page.wait_for_function(f"({USED_CELLS})() === {baseline}")
    expect(page.get_by_role("button", name=f"Kill process {pid}")).to_be_disabled()
    page.get_by_role("button", name=f"Kill process {neighbour}").click()
    expect(neighbour_row.locator("td.state")).to_have_text("killed")
    expect(page.locator("#kv-swap .cell.used")).to_have_count(0)
    assert console.errors == []
    page.close()


def test_keys_sign_in_and_own_processes(tiny_model_dir, browser, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    users = UserStore()
    users.add_user("alice")  # the first user is an admin
    users.add_user("bob", "user")
    alice, bob = users.create_key("alice"), users.create_key("bob")
    s = start_server(tiny_model_dir, kernel=KernelConfig(**KERNEL))
    slow_down(s)
    try:
        model = s.settings.preload[0]
        pids = {}
        for name, key in (("alice", alice), ("bob", bob)):
            pids[name] = spawn(s, f"{name} says", 200, key)
            # Suspended, so it stays in the table however fast the tiny model is.
            assert httpx.post(f"{s.url}/v1/processes/{pids[name]}/suspend",
                              headers={"Authorization": f"Bearer {key}"}).status_code == 200
        as_bob = {"Authorization": f"Bearer {bob}"}
        assert httpx.post(f"{s.url}/v1/models/{model}/unload", headers=as_bob).status_code == 403
        assert httpx.post(f"{s.url}/v1/models/{model}/pin", headers=as_bob).status_code == 403
        assert httpx.get(s.url + "/v1/residency").status_code == 401
        assert "path" not in httpx.get(s.url + "/v1/residency", headers=as_bob).json()["data"][0]

        page = browser.new_page(viewport={"width": 1024, "height": 560})
        console = Console(page)
        from playwright.sync_api import expect

        page.goto(s.url + "/")
        expect(page.locator("#signin")).to_be_visible()
        expect(page.locator("#desktop")).to_be_hidden()

        page.get_by_label("API key").fill("sk-llmos-00000000-not-a-real-key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signin-error")).to_contain_text("invalid API key")
        expect(page.locator("#desktop")).to_be_hidden()
        screenshot(page, "signin")

        page.get_by_label("API key").fill(bob)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_have_text("bob (user)")
        expect(page.locator(f'#proc-rows tr[data-pid="{pids["bob"]}"] td.state')).to_have_text("suspended")
        page.wait_for_timeout(1200)  # another refresh: still only bob's
        assert page.locator("#proc-rows tr").count() == 1
        assert page.locator(f'#proc-rows tr[data-pid="{pids["alice"]}"]').count() == 0
        expect(page.get_by_role("button", name=f"Unload model {model}")).to_be_disabled()

        # Only the wrong key's 401 may appear in the console.
        assert [e for e in console.errors if "401" not in e] == []
        assert len(console.errors) <= 1

        # An admin signs in (the key survives a reload in this tab) and may unload and load the model.
        page.get_by_role("button", name="Sign out").click()
        page.get_by_label("API key").fill(alice)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who")).to_have_text("alice (admin)")
        page.reload()
        expect(page.locator("#who")).to_have_text("alice (admin)")
        expect(page.locator(f'#proc-rows tr[data-pid="{pids["alice"]}"]')).to_be_visible()
        expect(page.locator(f'#proc-rows tr[data-pid="{pids["bob"]}"]')).to_have_count(0)
        page.get_by_label("Every user's processes").check()
        expect(page.locator(f'#proc-rows tr[data-pid="{pids["bob"]}"] td').first).to_have_text("bob")
        page.get_by_role("button", name=f"Unload model {model}").click()
        expect(page.locator(f'#model-rows tr[data-model="{model}"]')).to_contain_text("not loaded")
        page.get_by_role("button", name=f"Load model {model}").click()
        expect(page.locator(f'#model-rows tr[data-model="{model}"] td').first).to_have_text(re.compile("^loaded"))
        page.close()
    finally:
        s.stop()
