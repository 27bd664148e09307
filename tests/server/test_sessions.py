"""Persistent chat sessions: Kernel.warm_prefix against a kernel that computed the K/V itself, the session
endpoints and who may use them, SSE replies, a busy session, idle saving of the K/V, and a daemon restart whose
next reply hits the restored K/V in the prefix cache (a corrupt file is ignored)."""

from __future__ import annotations

import importlib.util
import json
import logging
import stat
import time
from pathlib import Path

import httpx
import pytest
import torch

from llmos.fs.sessions import SessionStore
from llmos.fs.users import UserStore
from llmos.kernel.kernel import Kernel, KernelConfig
from llmos.model.sampling import SamplingParams
from llmos.server import sessions
from llmos.server.sessions import cached_prefix

SYSTEM = ("You are a patient assistant. In the beginning God created the heaven and the earth. And the earth was "
          "without form, and void; and darkness was upon the face of the deep.")


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


start_server = _server_conftest().start_server


@pytest.fixture(scope="module")
def keys(llmos_home):
    store = UserStore(llmos_home / "llmos.db")
    store.add_user("root", "admin")
    store.add_user("alice", "user")
    store.add_user("bob", "user")
    return {name: store.create_key(name) for name in ("root", "alice", "bob")}


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, keys):
    server = start_server(tiny_model_dir)
    yield server
    server.stop()


def client(server, keys, who) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys[who]}"}, timeout=30)


def events(response) -> list:
    """The payloads of an SSE response (JSON objects, then "[DONE]"), checking the framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out, buf = [], []
    for line in response.iter_lines():
        if line:
            buf.append(line)
            continue
        assert len(buf) == 1 and buf[0].startswith("data: "), buf
        out.append(buf[0][6:] if buf[0][6:] == "[DONE]" else json.loads(buf[0][6:]))
        buf = []
    assert out[-1] == "[DONE]"
    return out


def error(r, status) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == status


def hits(c: httpx.Client, model: str) -> int:
    return c.get("/v1/memory").json()["models"][model]["prefix_cache"]["prefix_hits"]


# ---- the kernel method ----------------------------------------------------------------------------------------


def test_warm_prefix_puts_computed_kv_back_into_the_cache(tiny_model_dir, llmos_home):
    config = KernelConfig(kv_memory="4MiB", swap_memory=0)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = list(range(3, 43))  # 40 tokens: 2 full blocks of 16
    a = Kernel(tiny_model_dir, config)
    pa = a.spawn(prompt, greedy, owner="u")
    a.run_until_done()
    ids, kv = cached_prefix(a, prompt, "u")
    assert len(ids) == 32 and kv.shape[2] == 2 and cached_prefix(a, prompt, "v") == ([], None)

    b = Kernel(tiny_model_dir, config)
    before = b.memory()["prefix_cache"]
    assert b.warm_prefix(ids, kv, owner="u") == 2
    assert b.memory()["prefix_cache"] == before, "warming is not a lookup"
    assert b.memory()["cached_blocks"] == 2 and b.memory()["used_blocks"] == 0
    assert torch.equal(cached_prefix(b, prompt, "u")[1], kv)
    assert b.warm_prefix(ids, kv, owner="u") == 2 and b.memory()["cached_blocks"] == 2  # idempotent
    # Any block size of the saved K/V: 4 blocks of 8 tokens are 2 of the pool's 16.
    c = Kernel(tiny_model_dir, config)
    layers, _, _, _, heads, dim = kv.shape
    assert c.warm_prefix(ids + [1, 2], kv.reshape(layers, 2, 4, 8, heads, dim), owner="u") == 2
    with pytest.raises(ValueError, match="layers"):
        c.warm_prefix(ids, kv[:1], owner="u")

    pb = b.spawn(prompt, greedy, owner="u")
    b.run_until_done()
    assert b.memory()["prefix_cache"]["prefix_hits"] == 32
    assert pb.output_token_ids == pa.output_token_ids  # the same continuation as the kernel that computed them
    b.spawn(prompt, greedy, owner="v")
    b.run_until_done()
    assert b.memory()["prefix_cache"]["prefix_hits"] == 32, "another owner's prompt never hits them"


# ---- the endpoints ----------------------------------------------------------------------------------------------


def test_session_round_trip_and_permissions(daemon, keys):
    model = daemon.settings.preload[0]
    alice, bob, root = (client(daemon, keys, who) for who in ("alice", "bob", "root"))
    r = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM, "title": "first"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    with alice.stream("POST", f"/v1/sessions/{sid}/messages",
                      json={"content": "Hello there", "max_tokens": 8, "temperature": 0}) as r:
        assert r.status_code == 200, r.read()
        got = events(r)
    updates, final = got[:-2], got[-2]
    assert updates[-1]["finished"] and {u["pid"] for u in updates} == {final["pid"]}
    reply = "".join(u["text"] for u in updates)
    assert final["message"] == {"role": "assistant", "content": reply} and final["stored"]
    history = alice.get(f"/v1/sessions/{sid}").json()
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("system", SYSTEM), ("user", "Hello there"), ("assistant", reply)]

    before = hits(alice, model)
    r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "And then?", "max_tokens": 5, "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5 and r.json()["stored"]
    assert hits(alice, model) - before >= 32, "the shared history comes from the prefix cache"
    assert alice.get(f"/v1/sessions/{sid}").json()["messages"][-1]["content"] == r.json()["message"]["content"]

    listed = alice.get("/v1/sessions").json()["sessions"]
    assert [s["id"] for s in listed] == [sid] and listed[0]["messages"] == 5 and listed[0]["title"] == "first"
    assert bob.get("/v1/sessions").json()["sessions"] == []
    assert sid in [s["id"] for s in root.get("/v1/sessions", params={"all": "true"}).json()["sessions"]]
    error(bob.get("/v1/sessions", params={"all": "true"}), 403)
    error(bob.get(f"/v1/sessions/{sid}"), 403)
    error(bob.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}), 403)
    error(bob.delete(f"/v1/sessions/{sid}"), 403)
    assert root.get(f"/v1/sessions/{sid}").status_code == 200
    error(alice.get("/v1/sessions/s0123456789abcdef"), 404)
    error(alice.get("/v1/sessions/nonsense"), 404)
    error(alice.post("/v1/sessions", json={}), 400)
    error(alice.post("/v1/sessions", json={"model": model, "colour": "red"}), 400)
    error(alice.post("/v1/sessions", json={"model": "no-such-model"}), 404)
    error(alice.post(f"/v1/sessions/{sid}/messages", json={"content": ""}), 400)
    error(alice.post(f"/v1/sessions/{sid}/messages", json={"content": "x", "temperature": -1}), 400)
    error(alice.post(f"/v1/sessions/{sid}/messages", json={}), 400)

    assert alice.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "deleted": True}
    error(alice.get(f"/v1/sessions/{sid}"), 404)
    error(alice.delete(f"/v1/sessions/{sid}"), 404)


def test_busy_session_and_an_aborted_reply(daemon, keys, monkeypatch):
    model = daemon.settings.preload[0]
    kernel = daemon.state.models.get(model).kernel
    step = kernel.step
    monkeypatch.setattr(kernel, "step", lambda: (time.sleep(0.01), step())[1])  # replies last seconds
    alice = client(daemon, keys, "alice")
    sid = alice.post("/v1/sessions", json={"model": model}).json()["id"]
    with alice.stream("POST", f"/v1/sessions/{sid}/messages",
                      json={"content": "Tell a long story", "max_tokens": 200, "ignore_eos": True}) as r:
        pid = int(r.headers["x-llmos-pid"])
        lines = r.iter_lines()  # kept: a closed line iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        error(alice.post(f"/v1/sessions/{sid}/messages", json={"content": "hello?"}), 409)
    deadline = time.monotonic() + 10
    while alice.get(f"/v1/processes/{pid}").json()["state"] != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alice.get(f"/v1/processes/{pid}").json()["state"] == "KILLED", "a reply nobody reads is killed"
    assert alice.get(f"/v1/sessions/{sid}").json()["messages"] == [], "an aborted turn is not stored"
    while (r := alice.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 3,
                                                                  "stream": False})).status_code == 409:
        time.sleep(0.05)  # the abort is settled in a worker thread
    assert r.status_code == 200 and len(alice.get(f"/v1/sessions/{sid}").json()["messages"]) == 2


def test_idle_session_saves_its_kv(daemon, keys, monkeypatch, llmos_home):
    monkeypatch.setattr(sessions, "session_idle_s", 0.3)
    model = daemon.settings.preload[0]
    alice = client(daemon, keys, "alice")
    sid = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM}).json()["id"]
    assert alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Hi", "max_tokens": 4,
                                                            "stream": False}).status_code == 200
    path = SessionStore(llmos_home / "llmos.db").kv_path("alice", sid)
    deadline = time.monotonic() + 10
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert alice.get(f"/v1/sessions/{sid}").json()["kv"]["saved"]
    alice.delete(f"/v1/sessions/{sid}")
    assert not path.exists()


def test_unloading_the_model_saves_session_kv(daemon, keys, llmos_home):
    model = daemon.settings.preload[0]
    alice = client(daemon, keys, "alice")
    sid = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM}).json()["id"]
    assert alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Hi", "max_tokens": 4,
                                                            "stream": False}).status_code == 200
    path = SessionStore(llmos_home / "llmos.db").kv_path("alice", sid)
    assert not path.exists(), "not idle yet"
    assert daemon.state.models.unload(model)
    assert path.is_file(), "saved before the model's cache went away"
    r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Again", "max_tokens": 4, "stream": False})
    assert r.status_code == 200 and r.json()["usage"]["restored_kv_blocks"] >= 2  # the reloaded model gets them back


def test_kv_survives_a_restart_and_a_corrupt_file_is_ignored(tiny_model_dir, keys, llmos_home, caplog):
    first = start_server(tiny_model_dir)
    model = first.settings.preload[0]
    try:
        alice = client(first, keys, "alice")
        sid = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM}).json()["id"]
        r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello", "max_tokens": 6, "temperature": 0,
                                                             "stream": False})
        assert r.status_code == 200, r.text
    finally:
        first.stop()  # the shutdown hook saves the session's K/V
    path = SessionStore(llmos_home / "llmos.db").kv_path("alice", sid)
    assert path.is_file()

    second = start_server(tiny_model_dir)
    try:
        alice = client(second, keys, "alice")
        assert hits(alice, model) == 0
        r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Go on", "max_tokens": 6, "stream": False})
        assert r.status_code == 200, r.text
        restored = r.json()["usage"]["restored_kv_blocks"]
        assert restored >= 2
        assert hits(alice, model) >= 32, "the reply's prompt hit the restored history"
        assert len(alice.get(f"/v1/sessions/{sid}").json()["messages"]) == 5
    finally:
        second.stop()

    data = bytearray(path.read_bytes())
    data[-10:] = bytes(10)  # damage the tensor data: the checksum fails
    path.write_bytes(bytes(data))
    third = start_server(tiny_model_dir)
    try:
        alice = client(third, keys, "alice")
        with caplog.at_level(logging.WARNING, logger="llmos.server"):
            r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Again", "max_tokens": 4,
                                                                 "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["restored_kv_blocks"] == 0 and hits(alice, model) == 0
        assert "ignoring the saved K/V" in caplog.text
        assert len(alice.get(f"/v1/sessions/{sid}").json()["messages"]) == 7
    finally:
        third.stop()


def test_a_long_conversation_drops_its_oldest_turns_from_the_prompt_not_from_the_history(tiny_model_dir):
    from llmos.kernel.kernel import Kernel, KernelConfig
    from llmos.server.sessions import fit_prompt
    k = Kernel(tiny_model_dir, KernelConfig(kv_memory="8MiB", swap_memory=0))
    chat = [{"role": "system", "content": "be brief"}]
    for i in range(40):
        chat += [{"role": "user", "content": f"question number {i} " * 3},
                 {"role": "assistant", "content": f"answer number {i} " * 3}]
    chat.append({"role": "user", "content": "the last question"})
    ids = fit_prompt(k, chat, max_tokens=32)
    assert len(ids) <= k.context_length - 32
    text = k.tokenizer.decode(ids)
    assert "be brief" in text and "the last question" in text and "question number 0 " not in text
