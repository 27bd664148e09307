"""The native process API over a real daemon with three users (an admin, alice and bob): spawn, list, get, attach,
fork, suspend, resume, hibernate/restore, renice, kill, memory and the KV map; who may touch what; SSE framing;
what a disconnect kills; quotas."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

import httpx
import pytest

from llmos.fs.users import UserStore

PROMPT = "In the beginning God created the heaven and the earth."


def _server_conftest():
    # `from conftest import` would get whichever conftest.py pytest imported last (the names clash).
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


start_server = _server_conftest().start_server


def _users(home):
    store = UserStore(home / "llmos.db")
    store.add_user("root", "admin")
    keys = {"root": store.create_key("root")}
    for name in ("alice", "bob", "carol"):
        store.add_user(name, "user")
        keys[name] = store.create_key(name)
    store.set_quota("carol", max_processes=1, tokens_per_minute=30)
    return keys


class Api:
    """An httpx client of one user, with the model name and a few helpers."""

    def __init__(self, url: str, key: str | None, model: str) -> None:
        self.url, self.key, self.model = url, key, model
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=self.headers, timeout=30)

    def spawn(self, prompt=PROMPT, **kw):
        body = {"model": self.model, "prompt": prompt, "temperature": 0, **kw}
        return self.http.post("/v1/processes", json=body)

    def get(self, pid):
        return self.http.get(f"/v1/processes/{pid}")

    def wait(self, pid, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.get(pid).json()
            if row["state"] in ("FINISHED", "KILLED", "HIBERNATED"):
                return row
            time.sleep(0.02)
        raise AssertionError(f"process {pid} did not end: {row}")

    def post(self, path, body=None):
        return self.http.post(path, json=body)


@pytest.fixture(scope="module")
def users(llmos_home):
    return _users(llmos_home)


@pytest.fixture(scope="module")
def api(tiny_model_dir, users):
    server = start_server(tiny_model_dir)
    model = server.settings.preload[0]
    clients = {name: Api(server.url, key, model) for name, key in users.items()}
    clients["anonymous"] = Api(server.url, None, model)
    yield clients
    server.stop()


def events(response) -> list:
    """The payloads of an SSE response: JSON objects, and "[DONE]" last. Checks the framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out, buf = [], []
    for line in response.iter_lines():
        if line:
            buf.append(line)
            continue
        assert len(buf) == 1 and buf[0].startswith("data: "), buf
        data = buf[0][6:]
        out.append(data if data == "[DONE]" else json.loads(data))
        buf = []
    assert not buf and out[-1] == "[DONE]"
    return out


def error(r, status, type=None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["code"] == status and (type is None or body["type"] == type)
    return body["message"]


# ---- tests -------------------------------------------------------------------------------------------------


def test_process_lifecycle_and_ownership(api):
    alice, bob, root = api["alice"], api["bob"], api["root"]
    r = alice.spawn(max_tokens=200, ignore_eos=True)
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    assert r.json()["children"] == [] and r.json()["model"] == alice.model
    row = alice.post(f"/v1/processes/{pid}/suspend").json()
    assert row["state"] == "SUSPENDED" and row["owner"] == "alice" and row["model"] == alice.model

    assert pid in [x["pid"] for x in alice.http.get("/v1/processes").json()["processes"]]
    assert pid not in [x["pid"] for x in bob.http.get("/v1/processes").json()["processes"]]
    assert pid in [x["pid"] for x in root.http.get("/v1/processes", params={"all": "true"}).json()["processes"]]
    error(bob.http.get("/v1/processes", params={"all": "true"}), 403, "permission_error")
    for method, path, body in [("GET", "", None), ("DELETE", "", None), ("POST", "/suspend", None),
                               ("POST", "/resume", None), ("POST", "/fork", {"n": 1}), ("POST", "/renice", {"nice": 1}),
                               ("POST", "/hibernate", None), ("GET", "/stream", None)]:
        error(bob.http.request(method, f"/v1/processes/{pid}{path}", json=body), 403, "permission_error")
        error(alice.http.request(method, f"/v1/processes/999999{path}", json=body), 404, "not_found")
    error(api["anonymous"].http.get("/v1/processes"), 401, "authentication_error")

    detail = root.get(pid).json()
    assert detail["owner"] == "alice" and "text" in detail and detail["children"] == []
    assert alice.post(f"/v1/processes/{pid}/renice", {"nice": 5}).json()["nice"] == 5
    error(alice.post(f"/v1/processes/{pid}/renice", {"nice": 99}), 400)
    error(alice.post(f"/v1/processes/{pid}/renice", {"nice": "low"}), 400)
    assert alice.post(f"/v1/processes/{pid}/resume").json()["state"] in ("READY", "RUNNING", "FINISHED")
    error(alice.post(f"/v1/processes/{pid}/resume"), 400)  # not suspended
    final = alice.http.delete(f"/v1/processes/{pid}").json()
    assert final["state"] in ("KILLED", "FINISHED") and final["finish_reason"] in ("killed", "length")
    assert alice.http.delete(f"/v1/processes/{pid}").json()["state"] == final["state"]  # a no-op
    error(alice.post(f"/v1/processes/{pid}/suspend"), 400)
    assert pid in [x["pid"] for x in alice.http.get("/v1/processes", params={"finished": "true"}).json()["processes"]]


def test_bad_requests(api):
    alice = api["alice"]
    error(alice.http.post("/v1/processes", json={"model": alice.model}), 400)  # no prompt
    error(alice.http.post("/v1/processes", json={"model": alice.model, "prompt": "x", "prompt_token_ids": [1]}), 400)
    error(alice.spawn(temperature=-1), 400, "invalid_request_error")
    error(alice.spawn(max_tokens="many"), 400)
    error(alice.spawn(bogus=1), 400)
    error(alice.spawn(n=0), 400)
    error(alice.spawn(prompt_token_ids=None, prompt="hello" * 400), 413)
    error(alice.http.post("/v1/processes", json={"model": "no-such-model", "prompt": "x"}), 404)
    error(alice.http.post("/v1/processes", content=b"{not json", headers={"content-type": "application/json"}), 400)
    error(alice.http.get("/v1/processes/abc"), 400)


def test_stream_spawn_framing_and_parallel_samples(api):
    alice = api["alice"]
    with alice.http.stream("POST", "/v1/processes", json={"model": alice.model, "prompt": PROMPT, "temperature": 0,
                                                          "max_tokens": 8, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        pid = int(r.headers["x-llmos-pid"])
        got = events(r)
    updates = got[:-1]
    assert {u["pid"] for u in updates} == {pid} and updates[-1]["finished"] and updates[-1]["finish_reason"] == "length"
    assert not any(u["finished"] for u in updates[:-1])
    row = alice.get(pid).json()
    assert [t for u in updates for t in u["token_ids"]] == row["output_token_ids"]
    assert "".join(u["text"] for u in updates) == row["text"]

    with alice.http.stream("POST", "/v1/processes", json={"model": alice.model, "prompt": PROMPT, "n": 3, "seed": 1,
                                                          "max_tokens": 6, "ignore_eos": True, "stream": True}) as r:
        got = events(r)[:-1]
    pids = {u["pid"] for u in got}
    assert len(pids) == 3
    for p in pids:
        mine = [u for u in got if u["pid"] == p]
        assert mine[-1]["finished"] and sum(len(u["token_ids"]) for u in mine) == 6


def test_attach_from_two_clients_and_from_now(api):
    alice = api["alice"]
    pid = alice.spawn(max_tokens=40, ignore_eos=True).json()["pid"]

    async def attach(params=None):
        async with httpx.AsyncClient(base_url=alice.url, headers=alice.headers, timeout=30) as c:
            async with c.stream("GET", f"/v1/processes/{pid}/stream", params=params) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        data = [json.loads(x[6:]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and data[-1]["finished"]
        return [t for u in data for t in u["token_ids"]]

    async def both():
        return await asyncio.gather(attach(), attach())

    a, b = asyncio.run(both())
    full = alice.wait(pid)["output_token_ids"]
    assert a == b == full and len(full) == 40

    # from_now: a suspended process that has produced k tokens; the attach sees only what comes after them
    pid = alice.spawn(max_tokens=150, ignore_eos=True).json()["pid"]
    with alice.http.stream("GET", f"/v1/processes/{pid}/stream") as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["token_ids"]:
                break
        k = alice.post(f"/v1/processes/{pid}/suspend").json()["output_tokens"]

    async def later():
        task = asyncio.create_task(attach({"from_now": "true"}))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(alice.post, f"/v1/processes/{pid}/resume")
        return await task

    tail = asyncio.run(later())
    full = alice.wait(pid)["output_token_ids"]
    assert 0 < k < 150 and tail == full[k:]


def test_disconnect_kills_the_spawning_stream_but_not_an_attach(api):
    alice = api["alice"]
    with alice.http.stream("POST", "/v1/processes", json={"model": alice.model, "prompt": PROMPT, "max_tokens": 200,
                                                          "ignore_eos": True, "stream": True}) as r:
        pid = int(r.headers["x-llmos-pid"])
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    row = alice.wait(pid)
    assert row["state"] == "KILLED" and row["output_tokens"] < 200

    pid = alice.spawn(max_tokens=100, ignore_eos=True).json()["pid"]
    with alice.http.stream("GET", f"/v1/processes/{pid}/stream") as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    row = alice.wait(pid)
    assert row["state"] == "FINISHED" and row["finish_reason"] == "length" and row["output_tokens"] == 100


def test_fork_and_parallel_children(api):
    alice, bob = api["alice"], api["bob"]
    pid = alice.spawn(max_tokens=30, ignore_eos=True).json()["pid"]
    r = alice.post(f"/v1/processes/{pid}/fork", {"n": 2})
    assert r.status_code == 201, r.text
    kids = r.json()["pids"]
    error(alice.post(f"/v1/processes/{pid}/fork", {"n": 0}), 400)
    error(bob.post(f"/v1/processes/{pid}/fork", {"n": 1}), 403)
    parent = alice.wait(pid)
    assert sorted(parent["children"]) == sorted(kids)
    for k in kids:  # greedy: a child continues exactly as its parent does
        child = alice.wait(k)
        assert child["parent"] == pid and child["output_token_ids"] == parent["output_token_ids"]

    pid = alice.spawn(max_tokens=5, n=3, seed=7, temperature=1.0).json()["pid"]
    assert len(alice.wait(pid)["children"]) == 2


def test_hibernate_restore_keeps_the_greedy_continuation(api):
    alice, bob = api["alice"], api["bob"]
    reference = alice.wait(alice.spawn(max_tokens=80, ignore_eos=True).json()["pid"])["output_token_ids"]

    pid = alice.spawn(max_tokens=80, ignore_eos=True).json()["pid"]
    with alice.http.stream("GET", f"/v1/processes/{pid}/stream") as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["token_ids"]:
                break
        alice.post(f"/v1/processes/{pid}/suspend")
    r = alice.post(f"/v1/processes/{pid}/hibernate")
    assert r.status_code == 200, r.text
    hid = r.json()["hid"]
    row = alice.get(pid).json()
    assert row["state"] == "HIBERNATED" and 0 < row["output_tokens"] < 80
    assert hid in [h["hid"] for h in alice.http.get("/v1/hibernated").json()["hibernated"]]
    assert hid not in [h["hid"] for h in bob.http.get("/v1/hibernated").json()["hibernated"]]
    error(bob.http.get("/v1/hibernated", params={"owner": "alice"}), 403)
    listed = api["root"].http.get("/v1/hibernated", params={"owner": "alice"}).json()["hibernated"]
    assert hid in [h["hid"] for h in listed]
    error(bob.post(f"/v1/hibernated/{hid}/restore"), 404)
    error(alice.post("/v1/hibernated/not-an-id/restore", {"model": alice.model}), 400, "hibernation_error")

    r = alice.post(f"/v1/hibernated/{hid}/restore")
    assert r.status_code == 201, r.text
    new = r.json()["pid"]
    assert new != pid and r.json()["model"] == alice.model
    assert alice.wait(new)["output_token_ids"] == reference
    error(alice.post(f"/v1/hibernated/{hid}/restore", {"model": alice.model}), 404)


def test_killing_a_hibernated_process_deletes_its_image(api):
    alice, bob = api["alice"], api["bob"]

    def hibernated(max_tokens=200) -> tuple[int, str]:
        pid = alice.spawn(max_tokens=max_tokens, ignore_eos=True).json()["pid"]
        alice.post(f"/v1/processes/{pid}/suspend")
        r = alice.post(f"/v1/processes/{pid}/hibernate")
        assert r.status_code == 200, r.text
        return pid, r.json()["hid"]

    def images() -> list[str]:
        return [h["hid"] for h in alice.http.get("/v1/hibernated").json()["hibernated"]]

    pid, hid = hibernated()
    error(bob.http.delete(f"/v1/processes/{pid}"), 403)
    assert hid in images()
    r = alice.http.delete(f"/v1/processes/{pid}")
    assert r.status_code == 200, r.text
    assert r.json()["pid"] == pid and r.json()["state"] == "KILLED" and r.json()["finish_reason"] == "killed"
    assert alice.get(pid).json()["state"] == "KILLED" and hid not in images()
    error(alice.post(f"/v1/hibernated/{hid}/restore"), 404)
    assert alice.http.delete(f"/v1/processes/{pid}").json()["state"] == "KILLED"  # again: nothing more to do

    pid, hid = hibernated()  # restored: the image belongs to the process that continues it
    new = alice.post(f"/v1/hibernated/{hid}/restore").json()["pid"]
    message = error(alice.http.delete(f"/v1/processes/{pid}"), 400)
    assert f"pid {new}" in message and hid in message
    assert alice.get(pid).json()["state"] == "HIBERNATED" and hid in images()
    assert alice.http.delete(f"/v1/processes/{new}").json()["state"] == "KILLED"
    assert hid not in images()  # the restored process ended: its image went with it (as before)
    assert alice.http.delete(f"/v1/processes/{pid}").json()["state"] == "KILLED"


def test_memory_and_kv_map(api):
    alice, bob, root = api["alice"], api["bob"], api["root"]
    mine = alice.spawn(max_tokens=200, ignore_eos=True).json()["pid"]
    theirs = bob.spawn(max_tokens=200, ignore_eos=True).json()["pid"]
    seen = False
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:  # while it runs, alice's process holds device blocks
        m = alice.http.get("/v1/kv/map").json()
        seen = any(v == mine for v, _ in m["runs"])
    assert seen
    for p, who in ((mine, alice), (theirs, bob)):
        who.post(f"/v1/processes/{p}/suspend")  # K/V go to host swap
    m = alice.http.get("/v1/kv/map", params={"model": alice.model}).json()
    assert sum(n for _, n in m["runs"]) == m["num_blocks"]
    assert sum(n for _, n in m["swap"]["runs"]) == m["swap"]["num_blocks"]
    values = {v for v, _ in m["runs"] + m["swap"]["runs"]}
    assert mine in values and theirs not in values and "other" in values and "free" in values
    assert set(m["processes"]) <= {str(mine)} and m["processes"][str(mine)]["owner"] == "alice"
    assert {v for v, _ in m["runs"]} <= {"free", "cached", "other"} | {int(p) for p in m["processes"]}
    full = root.http.get("/v1/kv/map").json()
    swapped = {v for v, _ in full["swap"]["runs"]}
    assert {mine, theirs} <= swapped and "other" not in swapped
    error(alice.http.get("/v1/kv/map", params={"model": "nope"}), 404)

    mem = alice.http.get("/v1/memory").json()["models"][alice.model]
    assert set(mem["owners"]) == {"alice"} and mem["owners"]["alice"]["swapped_blocks"] > 0
    assert {"prefix_hits", "prefix_queries"} <= set(mem["prefix_cache"])
    assert {"alice", "bob"} <= set(root.http.get("/v1/memory").json()["models"][alice.model]["owners"])
    alice.http.delete(f"/v1/processes/{mine}")
    root.http.delete(f"/v1/processes/{theirs}")  # an admin may kill anyone's
    assert bob.get(theirs).json()["state"] == "KILLED"


def test_quotas(api):
    carol = api["carol"]  # at most 1 process, 30 tokens a minute
    pid = carol.spawn(max_tokens=200, ignore_eos=True).json()["pid"]
    carol.post(f"/v1/processes/{pid}/suspend")
    error(carol.spawn(max_tokens=5), 429, "quota_exceeded")
    carol.http.delete(f"/v1/processes/{pid}")
    deadline = time.monotonic() + 10
    while (r := carol.spawn(max_tokens=20, ignore_eos=True)).status_code == 201 and time.monotonic() < deadline:
        carol.wait(r.json()["pid"])  # the charge (prompt + output tokens) lands when the process ends
        time.sleep(0.1)
    assert "tokens this minute" in error(r, 429, "quota_exceeded")
    assert int(r.headers["retry-after"]) >= 1
