"""The rules of isolation (issue 4, section 3) over a real daemon with real users and API keys: every API needs a
valid key; another user's processes and sessions are a 403 (admins excepted); the prefix cache never serves one
user's blocks to another; quotas (processes, tokens per minute, KV blocks) answer 429 with Retry-After and never
crash the daemon; oversized bodies and prompts are a 413; a client that goes away frees its blocks at once; two
users racing on one prompt each get the in-process oracle's greedy output; and `llmos serve` refuses a public
address while no user exists."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest

from llmos.fs.users import UserStore
from llmos.kernel import syscalls
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.model.sampling import SamplingParams
from llmos.server import app as server_app


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _server_conftest()
start_server, free_port = _conftest.start_server, _conftest.free_port

MAX_BODY = 64 * 1024
PROMPT_IDS = [5, 17, 42, 99, 3, 250, 11, 64, 128, 7, 31, 200, 150, 9, 77, 88, 101, 13, 2, 44]  # 20 tokens
WRONG_KEY = "sk-llmos-00000000-" + "A" * 32


@pytest.fixture(scope="module")
def keys(llmos_home):
    """Users in the daemon's database before it starts: an admin, two plain users and one per quota."""
    store = UserStore(llmos_home / "llmos.db")
    store.add_user("root", "admin")
    for name in ("alice", "bob", "carol", "dave", "erin", "zed"):
        store.add_user(name, "user")
    store.set_quota("carol", max_processes=1)
    store.set_quota("dave", tokens_per_minute=40)
    store.set_quota("erin", max_kv_blocks=4)  # 64 tokens of 16-token blocks
    store.set_quota("zed", max_processes=0)  # may run nothing
    keys = {name: store.create_key(name) for name in ("root", "alice", "bob", "carol", "dave", "erin", "zed")}
    revoked = store.create_key("alice", label="old")
    store.revoke_key(revoked.split("-")[2])
    keys["revoked"] = revoked
    return keys


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, keys):
    server = start_server(tiny_model_dir, max_body_bytes=MAX_BODY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(daemon):
    return daemon.settings.preload[0]


@pytest.fixture(scope="module")
def users(daemon, keys):
    clients = {name: httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for name, key in keys.items()}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, llmos_home):
    """A fresh in-process kernel of the served model."""
    return Kernel(tiny_model_dir, KernelConfig(kv_memory="8MiB", swap_memory=0))


def error(r: httpx.Response, status: int, type: str | None = None) -> str:
    """Check a JSON error of `status` (the daemon's `{"error": {...}}`, or Ollama's top-level string `error`);
    return its message."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    err = body["error"]
    if isinstance(err, dict):
        assert err["code"] == status and (type is None or err["type"] == type), body
        return err["message"]
    assert isinstance(err, str) and body["code"] == status and (type is None or body["type"] == type), body
    return err


def retry_after(r: httpx.Response) -> int:
    seconds = int(r.headers["retry-after"])
    assert 1 <= seconds <= 60, seconds
    return seconds


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextlib.contextmanager
def slow_engine(daemon, model, seconds: float = 0.02):
    """Each engine step takes `seconds` longer, so a generation is still running when the test acts."""
    engine = daemon.state.models.get(model).engine
    hook = lambda kernel, tokens: time.sleep(seconds)  # noqa: E731
    engine.step_hooks.append(hook)
    try:
        yield
    finally:
        engine.step_hooks.remove(hook)


def memory_of(c: httpx.Client, model: str) -> dict:
    """`model`'s /v1/memory as `c`'s user sees it (a non-admin sees only their own owners row)."""
    return c.get("/v1/memory").json()["models"][model]


def memory(users, model) -> dict:
    """`model`'s /v1/memory as the admin sees it: every owner."""
    return memory_of(users["root"], model)


def idle(daemon, model) -> None:
    kernel = daemon.state.models.get(model).kernel
    assert wait_until(lambda: not kernel.has_work() and kernel.block_manager.num_used_blocks == 0)


def spawn(c: httpx.Client, model: str, **kw) -> httpx.Response:
    return c.post("/v1/processes", json={"model": model, "prompt_token_ids": PROMPT_IDS, "temperature": 0, **kw})


def state(c: httpx.Client, pid: int) -> str:
    return c.get(f"/v1/processes/{pid}").json()["state"]


def wait_ended(c: httpx.Client, pid: int, timeout: float = 30.0) -> dict:
    assert wait_until(lambda: state(c, pid) in ("FINISHED", "KILLED", "HIBERNATED"), timeout), state(c, pid)
    return c.get(f"/v1/processes/{pid}").json()


def generation_requests(model: str, sid: str = "s0123456789abcdef") -> list[tuple[str, str, dict | None]]:
    """(method, path, body) of a request on every API, each valid but for its key."""
    return [
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2}),
        ("POST", "/api/generate", {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}),
        ("POST", "/api/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                               "options": {"num_predict": 2}}),
        ("POST", "/v1/processes", {"model": model, "prompt": "hi", "max_tokens": 2}),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "hi", "max_tokens": 2, "stream": False}),
    ]


# ---- authentication ----------------------------------------------------------------------------------------------


def test_every_api_needs_a_valid_key(daemon, model, keys, users):
    before = len(users["root"].get("/v1/processes", params={"all": "true", "finished": "true"}).json()["processes"])
    requests = generation_requests(model) + [
        ("GET", "/v1/models", None), ("GET", "/api/tags", None), ("GET", "/api/ps", None),
        ("GET", "/v1/processes", None), ("GET", "/v1/processes/1", None), ("GET", "/v1/processes/1/stream", None),
        ("DELETE", "/v1/processes/1", None), ("POST", "/v1/processes/1/fork", {"n": 1}),
        ("POST", "/v1/processes/1/suspend", None), ("POST", "/v1/processes/1/hibernate", None),
        ("GET", "/v1/memory", None), ("GET", "/v1/kv/map", None), ("GET", "/v1/hibernated", None),
        ("GET", "/v1/sessions", None), ("POST", "/v1/sessions", {"model": model}),
        ("GET", "/v1/sessions/s0123456789abcdef", None), ("DELETE", "/v1/sessions/s0123456789abcdef", None),
    ]
    credentials = [{}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": "Bearer nonsense"},
                   {"Authorization": f"Bearer {keys['revoked']}"}, {"x-api-key": WRONG_KEY},
                   {"Authorization": f"Basic {keys['alice']}"}]
    with httpx.Client(base_url=daemon.url, timeout=30) as anonymous:
        for method, path, body in requests:
            for headers in credentials:
                r = anonymous.request(method, path, json=body, headers=headers)
                message = error(r, 401, "authentication_error")
                assert "key" in message, message
        assert anonymous.get("/health").status_code == 200  # liveness needs no key
        assert anonymous.get("/v1/models", headers={"x-api-key": keys["alice"]}).status_code == 200
    after = users["root"].get("/v1/processes", params={"all": "true", "finished": "true"}).json()["processes"]
    assert len(after) == before, "a request without a valid key spawned nothing"


# ---- another user's processes and sessions -----------------------------------------------------------------------


def test_another_users_process_is_403_and_an_admin_may_act(daemon, model, users):
    alice, bob, root = users["alice"], users["bob"], users["root"]
    with slow_engine(daemon, model):
        r = spawn(alice, model, max_tokens=200, ignore_eos=True)
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        assert alice.post(f"/v1/processes/{pid}/suspend").json()["state"] == "SUSPENDED"

        for method, path, body in [("GET", f"/v1/processes/{pid}", None),
                                   ("GET", f"/v1/processes/{pid}/stream", None),
                                   ("DELETE", f"/v1/processes/{pid}", None),
                                   ("POST", f"/v1/processes/{pid}/suspend", None),
                                   ("POST", f"/v1/processes/{pid}/resume", None),
                                   ("POST", f"/v1/processes/{pid}/fork", {"n": 1}),
                                   ("POST", f"/v1/processes/{pid}/hibernate", None),
                                   ("POST", f"/v1/processes/{pid}/renice", {"nice": 5})]:
            error(bob.request(method, path, json=body), 403, "permission_error")
        row = alice.get(f"/v1/processes/{pid}").json()
        assert row["state"] == "SUSPENDED" and row["nice"] == 0 and row["children"] == [], "bob changed nothing"
        assert pid not in [x["pid"] for x in bob.get("/v1/processes", params={"finished": "true"}).json()["processes"]]
        error(bob.get("/v1/processes", params={"all": "true"}), 403, "permission_error")
        error(bob.get("/v1/hibernated", params={"owner": "alice"}), 403, "permission_error")
        assert "alice" not in memory_of(bob, model)["owners"]

        # an admin may do all of it
        assert pid in [x["pid"] for x in root.get("/v1/processes", params={"all": "true"}).json()["processes"]]
        assert root.get(f"/v1/processes/{pid}").json()["owner"] == "alice"
        assert root.post(f"/v1/processes/{pid}/renice", json={"nice": 5}).json()["nice"] == 5
        assert root.post(f"/v1/processes/{pid}/resume").status_code == 200
        with root.stream("GET", f"/v1/processes/{pid}/stream") as s:
            assert s.status_code == 200
            first = next(json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {"))
            assert first["pid"] == pid
        r = root.post(f"/v1/processes/{pid}/fork", json={"n": 1})
        assert r.status_code == 201, r.text
        child = r.json()["pids"][0]
        assert alice.get(f"/v1/processes/{child}").json()["owner"] == "alice", "a fork belongs to the parent's owner"
        error(bob.get(f"/v1/processes/{child}"), 403)
        assert root.post(f"/v1/processes/{child}/suspend").status_code == 200
        r = root.post(f"/v1/processes/{child}/hibernate")
        assert r.status_code == 200, r.text
        hid = r.json()["hid"]
        assert hid in [h["hid"] for h in alice.get("/v1/hibernated").json()["hibernated"]]
        assert hid not in [h["hid"] for h in bob.get("/v1/hibernated").json()["hibernated"]]
        error(bob.post(f"/v1/hibernated/{hid}/restore", json={"model": model}), 404)
        assert root.delete(f"/v1/processes/{pid}").json()["state"] == "KILLED"
    idle(daemon, model)


def test_another_users_session_is_403_and_an_admin_may_read_it(model, users):
    alice, bob, root = users["alice"], users["bob"], users["root"]
    r = alice.post("/v1/sessions", json={"model": model, "system": "Be brief.", "title": "private"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "secret", "max_tokens": 3, "stream": False})
    assert r.status_code == 200, r.text
    error(bob.get(f"/v1/sessions/{sid}"), 403, "permission_error")
    error(bob.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2}), 403)
    error(bob.delete(f"/v1/sessions/{sid}"), 403)
    error(bob.get("/v1/sessions", params={"all": "true"}), 403, "permission_error")
    assert sid not in [s["id"] for s in bob.get("/v1/sessions").json()["sessions"]]
    assert [m["content"] for m in root.get(f"/v1/sessions/{sid}").json()["messages"]][:2] == ["Be brief.", "secret"]
    assert sid in [s["id"] for s in root.get("/v1/sessions", params={"all": "true"}).json()["sessions"]]
    assert len(alice.get(f"/v1/sessions/{sid}").json()["messages"]) == 3, "bob's attempts changed nothing"
    assert root.delete(f"/v1/sessions/{sid}").json()["deleted"]


# ---- the prefix cache --------------------------------------------------------------------------------------------


def test_the_prefix_cache_never_serves_another_users_blocks(daemon, model, users):
    prompt = [(7 * i + 3) % 290 + 5 for i in range(100)]  # 6 full blocks of 16 tokens, seen nowhere else
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    hits = lambda: memory(users, model)["prefix_cache"]["prefix_hits"]  # noqa: E731
    idle(daemon, model)
    h0 = hits()
    first = users["alice"].post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    h1 = hits()
    assert h1 == h0, "nobody has computed this prompt yet"
    other = users["bob"].post("/v1/completions", json=body)
    h2 = hits()
    assert h2 == h1, "bob's request must not hit alice's cached blocks"
    again = users["alice"].post("/v1/completions", json=body)
    h3 = hits()
    assert h3 - h2 >= 96, "alice's repeat hits her own cached blocks"
    bob_again = users["bob"].post("/v1/completions", json=body)
    assert hits() - h3 >= 96, "and bob's repeat his own"
    texts = {r.json()["choices"][0]["text"] for r in (first, other, again, bob_again)}
    assert len(texts) == 1, "the same greedy output, computed or cached"


# ---- quotas ------------------------------------------------------------------------------------------------------


def new_session(c: httpx.Client, model: str) -> str:
    r = c.post("/v1/sessions", json={"model": model})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_process_quota_is_429_with_retry_after(daemon, model, users):
    carol = users["carol"]  # one live process at most
    sid = new_session(carol, model)
    with slow_engine(daemon, model):
        r = spawn(carol, model, max_tokens=200, ignore_eos=True)
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        carol.post(f"/v1/processes/{pid}/suspend")
        for method, path, body in generation_requests(model, sid):
            r = carol.request(method, path, json=body)
            assert "live processes" in error(r, 429, "quota_exceeded")
            retry_after(r)
        error(spawn(carol, model, n=2), 429)
        assert users["alice"].post("/v1/completions", json={"model": model, "prompt": "hi",
                                                            "max_tokens": 2}).status_code == 200, "others unaffected"
        carol.delete(f"/v1/processes/{pid}")
    for method, path, body in generation_requests(model, sid):  # one at a time fits again, the session too
        r = carol.request(method, path, json=body)
        assert r.status_code in (200, 201), (path, r.text)
        if path == "/v1/processes":
            wait_ended(carol, r.json()["pid"])
    assert carol.get("/health").status_code == 200


def test_token_rate_is_429_with_retry_after_until_the_window_passes(daemon, model, users, monkeypatch):
    dave = users["dave"]  # 40 tokens a minute
    sid = new_session(dave, model)
    body = {"model": model, "prompt": PROMPT_IDS[:8], "max_tokens": 8, "temperature": 0}
    for _ in range(10):
        r = dave.post("/v1/completions", json=body)
        if r.status_code != 200:
            break
    assert "tokens this minute" in error(r, 429, "quota_exceeded")
    retry_after(r)
    for method, path, req in generation_requests(model, sid):
        r = dave.request(method, path, json=req)
        error(r, 429, "quota_exceeded")
        retry_after(r)
    assert users["alice"].post("/v1/completions", json=body).status_code == 200, "others unaffected"

    real = time.monotonic
    clock = types.SimpleNamespace(monotonic=lambda: real() + 61, time=time.time)  # a minute later
    monkeypatch.setattr(server_app, "time", clock)
    r = dave.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert dave.get("/health").status_code == 200


def test_kv_block_quota_refuses_what_can_never_fit_and_queues_what_can(daemon, model, users):
    erin = users["erin"]  # 4 blocks of 16 tokens
    r = erin.post("/v1/completions", json={"model": model, "prompt": PROMPT_IDS, "max_tokens": 100})
    assert "KV blocks" in error(r, 429, "quota_exceeded")
    retry_after(r)
    error(spawn(erin, model, max_tokens=100), 429, "quota_exceeded")
    error(erin.post("/api/generate", json={"model": model, "prompt": "hi", "stream": False}), 429)  # to the context

    idle(daemon, model)
    peak = 0
    with slow_engine(daemon, model, 0.005):
        pids = []
        for _ in range(4):  # each needs 3 blocks (20 + 28 tokens): one or two run, the others wait
            r = spawn(erin, model, max_tokens=28, ignore_eos=True)
            assert r.status_code == 201, r.text
            pids.append(r.json()["pid"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owners = memory_of(erin, model)["owners"]
            peak = max(peak, owners.get("erin", {}).get("resident_blocks", 0))
            if not owners:
                break
    rows = [wait_ended(erin, pid) for pid in pids]
    assert all(x["state"] == "FINISHED" and x["output_tokens"] == 28 for x in rows), rows
    assert 0 < peak <= 4
    assert erin.get("/health").status_code == 200
    assert daemon.state.models.get(model).engine.steps_failed == 0


def test_a_zero_quota_is_a_quota_error(model, users):
    """`llmos user quota zed --max-processes 0` (the store accepts 0) means zed may run nothing: a 429 that says
    so, not a 400 about the daemon's own settings."""
    r = users["zed"].post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
    error(r, 429, "quota_exceeded")


# ---- size limits -------------------------------------------------------------------------------------------------


def test_an_oversized_body_is_413(daemon, model, users):
    alice = users["alice"]
    big = {"model": model, "prompt": "a" * (MAX_BODY + 10), "max_tokens": 2}
    for path in ("/v1/completions", "/v1/processes", "/api/generate", "/v1/sessions"):
        error(alice.post(path, json=big), 413, "request_too_large")
    assert alice.get("/health").status_code == 200


def test_an_oversized_chunked_body_is_413(daemon, model, users):
    """No Content-Length: the limit is enforced while the body streams in."""
    def body():
        yield b'{"model": "%s", "prompt": "' % model.encode()
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    r = users["alice"].post("/v1/completions", content=body(), headers={"content-type": "application/json"})
    error(r, 413, "request_too_large")


def test_a_prompt_over_the_context_is_413(model, users):
    alice = users["alice"]
    long_text = "In the beginning God created the heaven and the earth. " * 40  # > 256 tokens
    sid = new_session(alice, model)
    for method, path, body in [
        ("POST", "/v1/completions", {"model": model, "prompt": [7] * 300, "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": long_text}]}),
        ("POST", "/v1/processes", {"model": model, "prompt": long_text}),
        ("POST", "/api/generate", {"model": model, "prompt": long_text, "stream": False}),
        ("POST", "/api/chat", {"model": model, "messages": [{"role": "user", "content": long_text}],
                               "stream": False}),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": long_text, "stream": False}),
    ]:
        assert "context" in error(alice.request(method, path, json=body), 413, "request_too_large"), path
    assert alice.get(f"/v1/sessions/{sid}").json()["messages"] == []


# ---- disconnects -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai-chat", "openai-completions", "native"])
def test_a_client_that_disconnects_mid_stream_frees_its_blocks_at_once(daemon, model, users, api):
    alice = users["alice"]
    idle(daemon, model)
    kernel = daemon.state.models.get(model).kernel
    if api == "native":
        request = ("/v1/processes", {"model": model, "prompt_token_ids": PROMPT_IDS, "max_tokens": 200,
                                     "ignore_eos": True, "stream": True})
    elif api == "openai-chat":
        request = ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Tell a story"}],
                                            "max_tokens": 200, "temperature": 0.9, "seed": 1, "stream": True})
    else:
        request = ("/v1/completions", {"model": model, "prompt": PROMPT_IDS, "max_tokens": 200, "temperature": 0.9,
                                       "seed": 1, "stream": True})
    with slow_engine(daemon, model):
        with alice.stream("POST", request[0], json=request[1]) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data: {"))
            live = alice.get("/v1/processes").json()["processes"]
            assert len(live) == 1 and live[0]["resident_blocks"] > 0
            pid = live[0]["pid"]
        gone = time.monotonic()
        assert wait_until(lambda: state(alice, pid) == "KILLED", 2.0), "killed at once"
        assert wait_until(lambda: kernel.block_manager.num_used_blocks == 0, 2.0), "and its blocks freed"
        assert time.monotonic() - gone < 2.0
    row = alice.get(f"/v1/processes/{pid}").json()
    assert row["resident_blocks"] == 0 and row["output_tokens"] < 200
    assert "alice" not in memory(users, model)["owners"]


# ---- two users racing --------------------------------------------------------------------------------------------


def test_two_users_racing_on_one_prompt_each_get_their_own_output(daemon, model, users, oracle):
    params = dict(max_tokens=24, temperature=0)
    expected = syscalls.wait(oracle, syscalls.spawn(oracle, PROMPT_IDS, SamplingParams(**params)))
    idle(daemon, model)
    seen: dict[str, set[int]] = {"alice": set(), "bob": set()}
    failures: list[str] = []

    def via_openai(who: str, go: threading.Barrier) -> None:
        go.wait()
        r = users[who].post("/v1/completions", json={"model": model, "prompt": PROMPT_IDS, **params})
        if r.status_code != 200 or r.json()["choices"][0]["text"] != expected.text:
            failures.append(f"{who} openai: {r.status_code} {r.text[:200]}")

    def via_native(who: str, go: threading.Barrier) -> None:
        c = users[who]
        go.wait()
        r = c.post("/v1/processes", json={"model": model, "prompt_token_ids": PROMPT_IDS, **params})
        if r.status_code != 201:
            failures.append(f"{who} spawn: {r.status_code} {r.text[:200]}")
            return
        pid = r.json()["pid"]
        seen[who].add(pid)
        owners = {x["owner"] for x in c.get("/v1/processes", params={"finished": "true"}).json()["processes"]}
        if owners != {who}:
            failures.append(f"{who} sees processes of {owners}")
        with c.stream("GET", f"/v1/processes/{pid}/stream") as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        tokens = [t for e in events for t in e["token_ids"]]
        if tokens != expected.token_ids or "".join(e["text"] for e in events) != expected.text:
            failures.append(f"{who} native: {tokens} != {expected.token_ids}")

    batches: list[set[str]] = []  # the owners in the running batch after each step
    engine = daemon.state.models.get(model).engine
    record = lambda kernel, tokens: batches.append({p.owner for p in kernel.scheduler.running})  # noqa: E731
    engine.step_hooks.append(record)
    try:
        with slow_engine(daemon, model, 0.005):
            for _ in range(4):
                go = threading.Barrier(6)
                threads = [threading.Thread(target=f, args=(who, go)) for who in ("alice", "bob")
                           for f in (via_openai, via_native, via_openai)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert not any(t.is_alive() for t in threads)
    finally:
        engine.step_hooks.remove(record)
    assert not failures, failures
    assert any(owners == {"alice", "bob"} for owners in batches), "the two users really ran side by side"
    assert seen["alice"] and seen["bob"] and not seen["alice"] & seen["bob"]
    for who, other in (("alice", "bob"), ("bob", "alice")):
        listed = users[who].get("/v1/processes", params={"finished": "true"}).json()["processes"]
        assert {x["owner"] for x in listed} == {who}
        for pid in seen[other]:
            error(users[who].get(f"/v1/processes/{pid}"), 403)
    assert wait_until(lambda: memory(users, model)["used_blocks"] == 0), "every block back"
    assert memory(users, model)["owners"] == {}


# ---- binding -----------------------------------------------------------------------------------------------------


def test_a_public_address_without_users_is_refused(tmp_path):
    env = {**os.environ, "LLMOS_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "llmos.cli.main", "serve", "--host", "0.0.0.0", "--port",
                        str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "0.0.0.0" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_only_an_admin_sets_a_negative_nice_level(daemon, model, users):
    alice, root = users["alice"], users["root"]
    r = spawn(alice, model, max_tokens=4, nice=-5)
    assert r.status_code == 403 and "admin" in error(r, 403, "permission_error")
    r = spawn(alice, model, max_tokens=200, ignore_eos=True, nice=5)
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    error(alice.post(f"/v1/processes/{pid}/renice", json={"nice": -1}), 403, "permission_error")
    assert root.post(f"/v1/processes/{pid}/renice", json={"nice": -10}).json()["nice"] == -10
    root.delete(f"/v1/processes/{pid}")
