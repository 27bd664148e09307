"""Faults of a real daemon process (issue 4, section 5): `kill -9` in the middle of streaming generations and SQLite
writes, then a restart on the same LLMOS_HOME; and SIGTERM, which must shut down gracefully. In-flight clients get an
error, not a hang; after the restart the database passes `PRAGMA integrity_check`, users and keys still work, and a
session saved by an earlier graceful shutdown is back with its history and its K/V."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmos.fs.sessions import SessionStore
from llmos.fs.users import UserStore


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


free_port = _server_conftest().free_port

SYSTEM = ("You are a patient assistant. In the beginning God created the heaven and the earth. And the earth was "
          "without form, and void; and darkness was upon the face of the deep.")
CLIENT_TIMEOUT_S = 15.0  # an in-flight client still waiting after this long is hung
STOP_TIMEOUT_S = 15.0  # SIGTERM: uvicorn's graceful period is 10 s, an idle daemon needs far less


class Daemon:
    """`python -m llmos.cli.main serve` in a subprocess on a free loopback port, its log in `log`."""

    def __init__(self, home: Path, model_dir: Path, log: Path) -> None:
        self.home, self.port, self.log = home, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "LLMOS_HOME": str(home)}
        cmd = [sys.executable, "-m", "llmos.cli.main", "serve", "--port", str(self.port), "--model", str(model_dir),
               "--kv-memory", "64MiB", "--swap-memory", "16MiB", "--log-level", "warning"]
        self.out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the daemon did not answer /health:\n{log.read_text()[-3000:]}")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=CLIENT_TIMEOUT_S)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit within {STOP_TIMEOUT_S} s of SIGTERM") from None
        self.out.close()
        return code, time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL (kill -9)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.out.close()


@pytest.fixture
def home(tmp_path):
    """A scratch LLMOS_HOME with an admin and two users; their keys."""
    home = tmp_path / "home"
    store = UserStore(home / "llmos.db")
    store.add_user("root", "admin")
    store.add_user("alice", "user")
    store.add_user("bob", "user")
    return home, {name: store.create_key(name) for name in ("root", "alice", "bob")}


@pytest.fixture
def daemons(home, tiny_model_dir, tmp_path):
    """start() a daemon on the test's LLMOS_HOME; any still running at the end is killed."""
    started: list[Daemon] = []

    def start() -> Daemon:
        d = Daemon(home[0], tiny_model_dir, tmp_path / f"daemon-{len(started)}.log")
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def model_of(d: Daemon) -> str:
    return httpx.get(d.url + "/health").json()["models"][0]


def first_event(lines) -> dict:
    return next(json.loads(line[6:]) for line in lines if line.startswith("data: {"))


def integrity(home: Path) -> str:
    conn = sqlite3.connect(home / "llmos.db")
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_mid_generation_loses_nothing_that_was_saved(home, daemons):
    home, keys = home
    first = daemons()
    model = model_of(first)
    with first.client(keys["alice"]) as alice:
        sid = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM, "title": "kept"}).json()["id"]
        r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello", "max_tokens": 6, "temperature": 0,
                                                             "stream": False})
        assert r.status_code == 200 and r.json()["stored"], r.text
        reply = r.json()["message"]["content"]
    kv = SessionStore(home / "llmos.db").kv_path("alice", sid)
    assert not kv.exists(), "not idle long enough to be saved yet"
    first.terminate()  # its exit code is test_sigterm_during_a_reply_is_graceful_and_saves_the_session's business
    assert kv.is_file(), "the shutdown hook saved the session's K/V"
    history = [("system", SYSTEM), ("user", "Hello"), ("assistant", reply)]

    second = daemons()
    alice, bob = second.client(keys["alice"]), second.client(keys["bob"])
    got = alice.get(f"/v1/sessions/{sid}").json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == history and got["kv"]["saved"]

    writing = threading.Event()
    written: list[str] = []

    def write_sessions() -> None:  # SQLite transactions in flight when the daemon dies
        with second.client(keys["bob"]) as c:
            with contextlib.suppress(httpx.HTTPError):
                while True:
                    written.append(c.post("/v1/sessions", json={"model": model, "system": SYSTEM}).json()["id"])
                    writing.set()

    writer = threading.Thread(target=write_sessions, daemon=True)
    writer.start()
    assert writing.wait(10)
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        streams = [
            stack.enter_context(alice.stream("POST", f"/v1/sessions/{sid}/messages", json={
                "content": "Tell me everything", "max_tokens": 200, "ignore_eos": True})),
            stack.enter_context(bob.stream("POST", "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200,
                "temperature": 1.0, "seed": 1, "stream": True})),
            stack.enter_context(bob.stream("POST", "/v1/processes", json={
                "model": model, "prompt": "In the beginning", "max_tokens": 200, "ignore_eos": True,
                "stream": True})),
        ]
        iterators = [s.iter_lines() for s in streams]
        for s, lines in zip(streams, iterators):
            assert s.status_code == 200
            first_event(lines)
        second.kill()  # kill -9 in the middle of the three generations
        t0 = time.monotonic()
        for lines in iterators:
            try:
                for _ in lines:
                    pass
            except (httpx.RemoteProtocolError, httpx.ReadError) as e:
                errors.append(e)
        assert time.monotonic() - t0 < CLIENT_TIMEOUT_S
    assert len(errors) == 3, f"each in-flight client gets an error, got {errors}"
    writer.join(CLIENT_TIMEOUT_S)
    assert not writer.is_alive() and written
    alice.close()
    bob.close()

    assert integrity(home) == "ok"
    third = daemons()
    assert httpx.get(third.url + "/health").json()["status"] == "ok"
    assert integrity(home) == "ok"
    with third.client(keys["alice"]) as alice, third.client("sk-llmos-00000000-" + "A" * 32) as stranger:
        assert stranger.get("/v1/sessions").status_code == 401
        got = alice.get(f"/v1/sessions/{sid}").json()
        assert [(m["role"], m["content"]) for m in got["messages"]] == history, "the aborted turn left no trace"
        assert got["kv"]["saved"]
        r = alice.post(f"/v1/sessions/{sid}/messages", json={"content": "Again", "max_tokens": 4, "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["restored_kv_blocks"] >= 1, "the saved K/V came back into the prefix cache"
        assert len(alice.get(f"/v1/sessions/{sid}").json()["messages"]) == 5
    with third.client(keys["bob"]) as bob:
        mine = {s["id"] for s in bob.get("/v1/sessions").json()["sessions"]}
        assert set(written[:-1]) <= mine, "every session whose creation was answered is there"
    with third.client(keys["root"]) as root:
        assert root.get("/v1/processes", params={"all": "true"}).json()["processes"] == []
    third.terminate()
    assert integrity(home) == "ok"


def test_sigterm_during_a_reply_is_graceful_and_saves_the_session(home, daemons):
    home, keys = home
    d = daemons()
    model = model_of(d)
    with d.client(keys["alice"]) as alice:
        sid = alice.post("/v1/sessions", json={"model": model, "system": SYSTEM}).json()["id"]
        with alice.stream("POST", f"/v1/sessions/{sid}/messages", json={
                "content": "A long answer, please", "max_tokens": 120, "ignore_eos": True, "temperature": 0}) as s:
            lines = s.iter_lines()
            first_event(lines)
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]  # the reply in progress may finish
        assert events[-1] == "data: [DONE]", events[-3:]
        final = json.loads(events[-2][6:])
        assert final["finish_reason"] == "length" and final["stored"]
    try:
        code = d.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within {STOP_TIMEOUT_S} s of SIGTERM")
    assert time.monotonic() - t0 < STOP_TIMEOUT_S
    log = d.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert SessionStore(home / "llmos.db").kv_path("alice", sid).is_file(), "saved at shutdown"
    assert [m.role for m in SessionStore(home / "llmos.db").messages(sid)] == ["system", "user", "assistant"]
    assert integrity(home) == "ok"
    assert code == 0, f"a graceful shutdown exits 0, not {code} (a negative code: killed by that signal)"


def serve(home: Path, port: int, timeout: float = 60) -> subprocess.CompletedProcess:
    """`llmos serve` on `home` and `port` run to its end (one that starts would run until `timeout`)."""
    cmd = [sys.executable, "-m", "llmos.cli.main", "serve", "--port", str(port), "--kv-memory", "64MiB",
           "--log-level", "warning"]
    return subprocess.run(cmd, env={**os.environ, "LLMOS_HOME": str(home)}, capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_daemon_on_the_same_home_refuses_to_start(home, daemons):
    home, keys = home
    first = daemons()
    refused = serve(home, free_port())
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert f"pid {first.proc.pid}" in lines[0] and f"port {first.port}" in lines[0] and str(home) in lines[0]
    assert "LLMOS_HOME" in lines[0] and "Traceback" not in refused.stderr
    assert first.proc.poll() is None and httpx.get(first.url + "/health").status_code == 200
    lock = json.loads((home / "serve.lock").read_text())
    assert lock["pid"] == first.proc.pid and lock["port"] == first.port


def test_a_killed_daemon_does_not_block_the_next(home, daemons):
    home, keys = home
    first = daemons()
    first.kill()  # SIGKILL: no clean-up ran, the lock file is still there
    assert (home / "serve.lock").is_file()
    second = daemons()
    assert httpx.get(second.url + "/health").status_code == 200
    lock = json.loads((home / "serve.lock").read_text())
    assert lock["pid"] == second.proc.pid and lock["port"] == second.port
