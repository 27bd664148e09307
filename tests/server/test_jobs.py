"""Training as OS jobs (issue 5, section 6) over a real daemon: a submitted job runs as a child process, shows its
progress, writes its log, finishes; suspend checkpoints and stops it, resume continues it exactly, kill ends its whole
process group; a trainer that ignores SIGUSR1 is killed at the timeout; interactive inference pauses running jobs
(their progress does not advance while a generation runs, and goes on after); daemon shutdown suspends running jobs
and a restarted daemon resumes them; a crashed daemon's jobs are recovered (suspended or failed, or their live
trainer adopted and checkpointed); only admins submit, users see only their own jobs; and the CLI verbs (`llmos train
--detach`, ps, logs, suspend, resume, kill) drive it all.

Most tests run a stand-in trainer (FAKE_TRAINER below, which follows the run-directory contract: progress.json,
checkpoints/last, SIGUSR1 = checkpoint and stop, --resume), so they check the daemon's side exactly. The tests named
`test_real_trainer_*` run `python -m llmos.cli.train_cmd` itself: they need the trainer part's `--config` /
`--resume` / SIGUSR1 handling (llmos.train.config), and skip, saying so, until it is there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from llmos.fs.jobs import JobStore, is_job_ref, job_name, parse_job_id
from llmos.server.jobs import JobManager, pid_alive


def _server_conftest():
    path = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("llmos_tests_server_conftest_jobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _server_conftest()
start_server = _conftest.start_server

FAKE_TRAINER = r'''
"""A stand-in for `python -m llmos.cli.train_cmd --config FILE [--resume]` that follows the run-directory contract:
one "step" every step_s seconds, progress.json rewritten atomically after each, checkpoints/last/state.json every
save_interval steps and on SIGUSR1 (then progress state "suspended" and exit 0), --resume continues from it. Every
step appends its number to <out>/steps.txt, so a test can check that nothing was skipped or done twice."""
import argparse, json, os, signal, sys, time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--resume", action="store_true")
args = ap.parse_args()
c = json.loads(Path(args.config).read_text())
out = Path(c["out_dir"])
out.mkdir(parents=True, exist_ok=True)
total, delay, every = c["max_steps"], c.get("step_s", 0.02), c.get("save_interval", 0)
stop = []
if not c.get("ignore_sigusr1"):
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
else:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def progress(step, state):
    atomic(out / "progress.json", json.dumps({"step": step, "total_steps": total, "tokens": step * 128,
           "train_loss": 5.0 / (1 + step), "val_loss": None, "tokens_per_s": 1000.0, "eta_s": (total - step) * delay,
           "state": state}))


def checkpoint(step):
    last = out / "checkpoints" / "last"
    last.mkdir(parents=True, exist_ok=True)
    atomic(last / "state.json", json.dumps({"step": step}))


step = 0
if args.resume:
    step = json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"]
    print(f"resumed at step {step}", flush=True)
if c.get("fail"):
    print("error: the data is bad", flush=True)
    sys.exit(2)
print(f"training {total} steps", flush=True)
while step < total:
    if stop:
        checkpoint(step)
        progress(step, "suspended")
        print(f"checkpointed at step {step}", flush=True)
        sys.exit(0)
    time.sleep(delay)
    step += 1
    with open(out / "steps.txt", "a") as f:
        f.write(f"{step}\n")
    print(f"step {step}", flush=True)
    if every and step % every == 0:
        checkpoint(step)
    progress(step, "running")
(out / "config.json").write_text("{}")
progress(step, "finished")
print("done", flush=True)
'''

WAIT_S = 60


@pytest.fixture(scope="module")
def fake_trainer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fake-trainer") / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


@pytest.fixture(scope="module")
def daemon(server, fake_trainer):
    """The module's single-user daemon, its jobs run by the stand-in trainer."""
    jobs: JobManager = server.state.jobs
    jobs.command = (sys.executable, str(fake_trainer))
    jobs.suspend_timeout_s = 10.0
    return server


@pytest.fixture
def api(daemon):
    with httpx.Client(base_url=daemon.url, timeout=60) as c:
        yield c


def wait_for(what, timeout: float = WAIT_S, every: float = 0.05):
    """Poll `what()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {getattr(what, '__name__', what)}")


def submit(api, out_dir: Path, **config) -> dict:
    r = api.post("/v1/jobs", json={"config": {"data": [], "out_dir": str(out_dir), "max_steps": 20, **config}})
    assert r.status_code == 201, r.text
    return r.json()


def job(api, name: str) -> dict:
    r = api.get(f"/v1/jobs/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_state(api, name: str, *states: str, timeout: float = WAIT_S) -> dict:
    def reached():
        row = job(api, name)
        return row if row["state"] in states else None
    return wait_for(reached, timeout)


def wait_step(api, name: str, at_least: int) -> dict:
    def reached():
        row = job(api, name)
        p = row["progress"] or {}
        assert row["state"] in ("queued", "running"), row
        return row if p.get("step", 0) >= at_least else None
    return wait_for(reached)


def steps_done(out_dir: Path) -> list[int]:
    path = out_dir / "steps.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


# ---- the record ---------------------------------------------------------------------------------------


def test_job_ids_and_crash_recovery_in_the_store(tmp_path):
    assert [parse_job_id(x) for x in ("j3", "J3", "job-3", "job3", "3", 3, "j0", "x3", "j", "", "3a", -1)] == \
        [3, 3, 3, 3, 3, 3, None, None, None, None, None, None]
    assert is_job_ref("j3") and is_job_ref("job-12") and not is_job_ref("3") and not is_job_ref("h0123456789")
    assert job_name(7) == "j7"
    store = JobStore(tmp_path / "llmos.db")
    assert store.list() == [] and not (tmp_path / "llmos.db").exists()  # reading creates nothing
    with_ckpt, without, queued = (store.create("ada", {"out_dir": str(tmp_path / n)}, str(tmp_path / n))
                                  for n in ("a", "b", "c"))
    (tmp_path / "a" / "checkpoints" / "last").mkdir(parents=True)
    for j in (with_ckpt, without):
        store.update(j.id, state="running", started=time.time(), pid=2**22 + 1)
    changed = {j.id: j for j in store.recover()}
    assert set(changed) == {with_ckpt.id, without.id}
    assert changed[with_ckpt.id].state == "suspended" and changed[with_ckpt.id].resume
    assert "last checkpoint" in changed[with_ckpt.id].note
    assert changed[without.id].state == "failed" and "before any checkpoint" in changed[without.id].note
    assert store.get(queued.id).state == "queued"
    assert [j.id for j in store.list(owner="ada", states=("queued",))] == [queued.id]


# ---- a job's life -------------------------------------------------------------------------------------------


def test_a_job_runs_to_the_end_with_progress_and_log(api, tmp_path):
    row = submit(api, tmp_path / "run", max_steps=30, step_s=0.03)
    assert row["id"].startswith("j") and row["state"] == "queued" and row["config"]["max_steps"] == 30
    running = wait_step(api, row["id"], 3)
    assert running["state"] == "running" and running["pid"] > 0
    listed = api.get("/v1/jobs").json()["jobs"]
    assert row["id"] in [j["id"] for j in listed]
    p = running["progress"]
    assert p["total_steps"] == 30 and p["state"] == "running" and p["train_loss"] > 0
    done = wait_state(api, row["id"], "finished", "failed")
    assert done["state"] == "finished" and done["exit_code"] == 0 and done["progress"]["state"] == "finished"
    assert steps_done(tmp_path / "run") == list(range(1, 31))
    assert row["id"] not in [j["id"] for j in api.get("/v1/jobs").json()["jobs"]]  # live ones only
    assert row["id"] in [j["id"] for j in api.get("/v1/jobs", params={"finished": "true"}).json()["jobs"]]
    log = api.get(f"/v1/jobs/{row['id']}/log").text
    assert "started at" in log and "step 1\n" in log and "step 30\n" in log and log.rstrip().endswith("done")
    assert api.get(f"/v1/jobs/{row['id']}/log", params={"offset": len(log) - 5}).text == log[-5:]
    assert not pid_alive(done["pid"])


def test_a_failing_trainer_fails_the_job_with_its_status(api, tmp_path):
    row = submit(api, tmp_path / "bad", fail=True)
    done = wait_state(api, row["id"], "finished", "failed")
    assert done["state"] == "failed" and done["exit_code"] == 2 and f"llmos logs {row['id']}" in done["note"]
    assert "the data is bad" in api.get(f"/v1/jobs/{row['id']}/log").text


def test_suspend_checkpoints_and_stops_and_resume_continues_exactly(api, tmp_path):
    out = tmp_path / "run"
    row = submit(api, out, max_steps=40, step_s=0.04)
    wait_step(api, row["id"], 5)
    r = api.post(f"/v1/jobs/{row['id']}/suspend")
    assert r.status_code == 200, r.text
    held = r.json()
    assert held["state"] == "suspended" and held["exit_code"] == 0 and held["progress"]["state"] == "suspended"
    assert held["note"] is None  # a plain suspend needs no explanation
    step = held["progress"]["step"]
    assert 5 <= step < 40 and json.loads((out / "checkpoints/last/state.json").read_text())["step"] == step
    assert not pid_alive(held["pid"])
    time.sleep(0.3)
    assert steps_done(out) == list(range(1, step + 1))  # stopped: nothing more happens
    assert error_of(api.post(f"/v1/jobs/{row['id']}/suspend"))["code"] == 409
    r = api.post(f"/v1/jobs/{row['id']}/resume")
    assert r.status_code == 200 and r.json()["state"] in ("queued", "running")
    done = wait_state(api, row["id"], "finished", "failed")
    assert done["state"] == "finished"
    assert steps_done(out) == list(range(1, 41))  # no step skipped, none done twice
    log = api.get(f"/v1/jobs/{row['id']}/log").text
    assert f"checkpointed at step {step}" in log and f"resumed at step {step}" in log and "--resume" in log
    assert error_of(api.post(f"/v1/jobs/{row['id']}/resume"))["code"] == 409


def test_kill_ends_the_whole_process_group(api, tmp_path):
    row = submit(api, tmp_path / "run", max_steps=10_000, step_s=0.02)
    running = wait_step(api, row["id"], 2)
    r = api.delete(f"/v1/jobs/{row['id']}")
    assert r.status_code == 200, r.text
    killed = r.json()
    assert killed["state"] == "killed" and killed["exit_code"] == -signal.SIGKILL
    assert not pid_alive(running["pid"])
    with pytest.raises(ProcessLookupError):
        os.killpg(running["pid"], 0)  # nothing is left in its group
    assert error_of(api.delete(f"/v1/jobs/{row['id']}"))["code"] == 409
    assert error_of(api.post(f"/v1/jobs/{row['id']}/resume"))["code"] == 409


def test_a_trainer_that_ignores_sigusr1_is_killed_at_the_timeout(api, daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(daemon.state.jobs, "suspend_timeout_s", 1.0)
    row = submit(api, tmp_path / "none", max_steps=10_000, ignore_sigusr1=True)
    wait_step(api, row["id"], 2)
    t0 = time.monotonic()
    failed = api.post(f"/v1/jobs/{row['id']}/suspend").json()
    assert 0.9 < time.monotonic() - t0 < 10
    assert failed["state"] == "failed" and "did not checkpoint within 1 s" in failed["note"]
    # With an earlier checkpoint it is suspended there instead, and says so.
    row = submit(api, tmp_path / "some", max_steps=10_000, ignore_sigusr1=True, save_interval=3)
    wait_step(api, row["id"], 4)
    held = api.post(f"/v1/jobs/{row['id']}/suspend").json()
    assert held["state"] == "suspended" and "did not checkpoint within 1 s" in held["note"]
    api.delete(f"/v1/jobs/{row['id']}")


def test_queued_jobs_wait_for_the_running_one_and_can_be_held(api, tmp_path):
    first = submit(api, tmp_path / "a", max_steps=25, step_s=0.03)
    second = submit(api, tmp_path / "b", max_steps=5, step_s=0.01)
    third = submit(api, tmp_path / "c", max_steps=5, step_s=0.01)
    wait_step(api, first["id"], 1)
    assert job(api, second["id"])["state"] == "queued"  # max_running = 1
    held = api.post(f"/v1/jobs/{third['id']}/suspend").json()
    assert held["state"] == "suspended" and held["started"] is None
    assert wait_state(api, second["id"], "finished")["state"] == "finished"
    assert job(api, first["id"])["state"] == "finished"  # the older one ran first
    assert job(api, third["id"])["state"] == "suspended"
    api.post(f"/v1/jobs/{third['id']}/resume")
    assert wait_state(api, third["id"], "finished")["state"] == "finished"
    assert steps_done(tmp_path / "c") == [1, 2, 3, 4, 5]  # held before it started: resume starts it afresh


# ---- interactive priority -------------------------------------------------------------------------------------


def test_interactive_inference_pauses_running_jobs(api, daemon, tmp_path):
    out = tmp_path / "run"
    row = submit(api, out, max_steps=100_000, step_s=0.01)
    wait_step(api, row["id"], 3)
    model = daemon.settings.preload[0]
    kernel = daemon.state.models.get(model).kernel
    samples = []  # (seconds since the generation began, step, the kernel has work, the job row says yielding)

    def generate() -> list[int]:
        return [api.post("/v1/processes", json={"model": model, "prompt": "In the beginning", "max_tokens": 200,
                                                "ignore_eos": True, "temperature": 0}).json()["pid"]
                for _ in range(4)]

    pids = generate()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5 or kernel.has_work():  # keep inference busy for at least 1.5 s
        if time.monotonic() - t0 < 1.5 and not kernel.has_work():
            pids += generate()  # a gap far shorter than the 0.5 s grace: the job stays paused
        busy = kernel.has_work()
        r = job(api, row["id"])
        samples.append((time.monotonic() - t0, len(steps_done(out)), busy, r["yielding"]))
        time.sleep(0.02)
    settled = [s for s in samples if s[0] > 0.15]  # the monitor reacts within poll_s (0.05 s)
    assert len(settled) > 5 and settled[-1][0] > 1.4, samples
    assert all(s[3] for s in settled), samples  # ps says "yielding"
    assert len({s[1] for s in settled}) == 1, samples  # and its steps do not advance
    for pid in pids:
        assert api.get(f"/v1/processes/{pid}").json()["state"] == "FINISHED"
    paused_at = settled[-1][1]
    again = wait_for(lambda: (r := job(api, row["id"]))["progress"]["step"] > paused_at + 5 and r)  # after the grace
    assert again["yielding"] is False and again["state"] == "running"
    api.delete(f"/v1/jobs/{row['id']}")


# ---- the daemon stopping and starting ---------------------------------------------------------------------------


def test_daemon_shutdown_suspends_jobs_and_a_new_daemon_resumes_them(tiny_model_dir, fake_trainer, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    first = start_server(tiny_model_dir)
    first.state.jobs.command = (sys.executable, str(fake_trainer))
    try:
        with httpx.Client(base_url=first.url, timeout=60) as api:
            row = submit(api, out, max_steps=60, step_s=0.03)
            running = wait_step(api, row["id"], 4)
    finally:
        first.stop()
    job_id = parse_job_id(row["id"])
    stored = JobStore(tmp_path / "home" / "llmos.db").get(job_id)
    assert stored.state == "suspended" and stored.resume and "the daemon shut down" in stored.note
    assert not pid_alive(running["pid"])
    step = json.loads((out / "checkpoints/last/state.json").read_text())["step"]
    assert steps_done(out) == list(range(1, step + 1))
    second = start_server(tiny_model_dir)
    second.state.jobs.command = (sys.executable, str(fake_trainer))
    try:
        with httpx.Client(base_url=second.url, timeout=60) as api:
            assert job(api, row["id"])["state"] == "suspended"  # stays so until asked
            api.post(f"/v1/jobs/{row['id']}/resume")
            assert wait_state(api, row["id"], "finished", "failed")["state"] == "finished"
    finally:
        second.stop()
    assert steps_done(out) == list(range(1, 61))


def test_a_crashed_daemons_jobs_are_recovered_and_a_live_trainer_adopted(fake_trainer, tmp_path):
    store = JobStore(tmp_path / "llmos.db")
    dead = store.create("local", {"out_dir": str(tmp_path / "dead")}, str(tmp_path / "dead"))
    store.update(dead.id, state="running", started=time.time(), pid=2**22 + 7)
    live_out = tmp_path / "live"
    orphan = store.create("local", {"out_dir": str(live_out)}, str(live_out))
    config = store.job_dir(orphan.id) / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"out_dir": str(live_out), "max_steps": 10_000, "step_s": 0.02}))
    proc = subprocess.Popen([sys.executable, str(fake_trainer), "--config", str(config)], start_new_session=True,
                            stdout=subprocess.DEVNULL)
    try:
        store.update(orphan.id, state="running", started=time.time(), pid=proc.pid)
        # A job another live daemon on this LLMOS_HOME runs (here: any other live process) is left alone.
        theirs = store.create("local", {"out_dir": str(tmp_path / "theirs")}, str(tmp_path / "theirs"))
        store.update(theirs.id, state="running", started=time.time(), daemon=proc.pid)
        wait_for(lambda: len(steps_done(live_out)) >= 3)
        jobs = JobManager(store, suspend_timeout_s=10).start()
        assert store.get(dead.id).state == "failed"
        assert store.get(theirs.id).state == "running"
        with pytest.raises(Exception, match="another llmos daemon"):
            jobs.suspend(theirs.id)
        adopted = wait_for(lambda: (j := store.get(orphan.id)).state != "running" and j)
        assert adopted.state == "suspended" and "the daemon restarted" in adopted.note
        assert proc.wait(5) == 0
        step = json.loads((live_out / "checkpoints/last/state.json").read_text())["step"]
        assert steps_done(live_out) == list(range(1, step + 1))
        jobs.shutdown()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


# ---- who may do what ---------------------------------------------------------------------------------------------


def test_only_admins_submit_and_users_see_only_their_own_jobs(tiny_model_dir, fake_trainer, tmp_path, monkeypatch):
    from llmos.fs.users import UserStore

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    users = UserStore()
    users.add_user("root", "admin")
    users.add_user("alice", "user")
    keys = {name: users.create_key(name) for name in ("root", "alice")}
    keyed = start_server(tiny_model_dir)
    keyed.state.jobs.command = (sys.executable, str(fake_trainer))
    clients = {name: httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
               for name, key in keys.items()}
    root, alice = clients["root"], clients["alice"]
    try:
        body = {"config": {"data": [], "out_dir": str(tmp_path / "run"), "max_steps": 10_000}}
        refused = alice.post("/v1/jobs", json=body)
        assert refused.status_code == 403 and "needs an admin" in error_of(refused)["message"]
        assert httpx.post(keyed.url + "/v1/jobs", json=body).status_code == 401
        for bad in ({"data": [], "out_dir": "runs/a"}, {"data": ["corpus.txt"], "out_dir": "/tmp/x"},
                    {"data": [], "out_dir": "/tmp/x", "init_from": "ckpt"}, {"data": []}, "not an object"):
            r = root.post("/v1/jobs", json={"config": bad})
            assert r.status_code == 400, (bad, r.text)
        hostile = ['{"config": {"out_dir": "/tmp/x", "lr": NaN}}', '{"config": {"out_dir": "/tmp/x", "data": [1]}}',
                   '{"config": {"out_dir": "/tmp/x", "data": "/a", "shards_dir": 3}}', '{"config": []}', "{",
                   '{"config": {"out_dir": "/tmp/x"}, "extra": 1}', '{"config": ' + "[" * 5000 + "]" * 5000 + "}",
                   '{"config": {"out_dir": ' + "[" * 900 + "]" * 900 + "}}"]
        for text in hostile:
            r = root.post("/v1/jobs", content=text, headers={"content-type": "application/json"})
            assert r.status_code == 400 and error_of(r)["message"], (text[:60], r.status_code, r.text[:200])
        assert root.get("/v1/jobs", params={"finished": "true"}).json()["jobs"] == []  # none was created
        row = root.post("/v1/jobs", json=body).json()
        again = root.post("/v1/jobs", json=body)
        assert again.status_code == 409 and row["id"] in error_of(again)["message"]  # one live job per out dir
        wait_step(root, row["id"], 1)
        assert alice.get("/v1/jobs").json()["jobs"] == []
        assert alice.get("/v1/jobs", params={"all": "true"}).status_code == 403
        for method, path in (("GET", ""), ("POST", "/suspend"), ("POST", "/resume"), ("DELETE", ""), ("GET", "/log")):
            r = alice.request(method, f"/v1/jobs/{row['id']}{path}")
            assert r.status_code == 404 and error_of(r)["type"] == "not_found", (method, path, r.text)
        assert root.get("/v1/jobs/j999999").status_code == 404 and root.get("/v1/jobs/nope").status_code == 404
        assert [j["id"] for j in root.get("/v1/jobs", params={"all": "true"}).json()["jobs"]] == [row["id"]]
        assert root.delete(f"/v1/jobs/{row['id']}").json()["state"] == "killed"
    finally:
        for c in clients.values():
            c.close()
        keyed.stop()


# ---- the command line ------------------------------------------------------------------------------------------


runner = CliRunner()


def llmos(*args):
    from llmos.cli import main as cli

    return runner.invoke(cli.app, [str(a) for a in args])


def test_the_cli_submits_lists_follows_suspends_resumes_and_kills_jobs(daemon, api, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOST", daemon.url)
    monkeypatch.delenv("LLMOS_API_KEY", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("hello world\n")
    done = llmos("train", "--detach", "--data", "corpus.txt", "--out", "run", "--max-steps", "5000")
    assert done.exit_code == 0, done.output
    name = done.stdout.strip()
    assert is_job_ref(name) and f"llmos logs {name}" in done.stderr
    row = job(api, name)
    assert row["config"]["data"] == [str(tmp_path / "corpus.txt")] and row["out_dir"] == str(tmp_path / "run")
    wait_step(api, name, 3)
    listed = llmos("ps")
    assert listed.exit_code == 0, listed.output
    line = next(x for x in listed.stdout.splitlines() if x.split() and x.split()[0] == name).split()
    assert line[2] in ("running", "yielding") and line[3].endswith("/5000")
    top = llmos("top", "--iterations", "1")
    assert top.exit_code == 0, top.output
    assert any(x.split()[:1] == [name] and x.split()[2] in ("running", "yielding") for x in top.stdout.splitlines())
    suspended = llmos("suspend", name)
    assert suspended.exit_code == 0 and "suspended at step" in suspended.stderr, suspended.output
    assert f"`llmos resume {name}` continues it" in suspended.stderr
    step = job(api, name)["progress"]["step"]
    logs = llmos("logs", name)
    assert logs.exit_code == 0 and f"checkpointed at step {step}" in logs.stdout
    assert llmos("resume", name).exit_code == 0
    wait_step(api, name, step + 3)
    assert llmos("kill", name).exit_code == 0
    assert job(api, name)["state"] == "killed"
    everything = llmos("ps", "--all").stdout
    assert any(x.split()[:3] == [name, "local", "killed"] for x in everything.splitlines() if x.split())
    follow = llmos("logs", name, "--follow")  # an ended job: prints the whole log and returns
    assert follow.exit_code == 0 and "resumed at step" in follow.stdout
    bad = llmos("kill", "jx")
    assert bad.exit_code == 2 and "neither a pid nor a job id" in bad.stderr
    missing = llmos("suspend", "j99999")
    assert missing.exit_code == 2 and "no job" in missing.stderr


def test_logs_follow_streams_until_the_job_ends(daemon, api, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOST", daemon.url)
    row = submit(api, tmp_path / "run", max_steps=25, step_s=0.04)
    followed = llmos("logs", row["id"], "-f")
    assert followed.exit_code == 0, followed.output
    assert followed.stdout.rstrip().endswith("done") and "step 25\n" in followed.stdout
    assert job(api, row["id"])["state"] == "finished"


def test_train_detach_without_a_daemon_is_one_line_and_exit_2(tmp_path, monkeypatch):
    port = _conftest.free_port()
    monkeypatch.setenv("LLMOS_HOST", f"127.0.0.1:{port}")
    result = llmos("train", "--detach", "--data", "x.txt", "--out", "o")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: no llmos daemon at") and "--detach" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- the real trainer ------------------------------------------------------------------------------------------

def tiny_train_config(tmp_path: Path, **overrides) -> dict:
    from llmos.train.config import TrainConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog {i % 7}." for i in range(400)))
    config = TrainConfig(data=[str(corpus)], out_dir=str(tmp_path / "out"), vocab_size=300, hidden_size=32,
                         num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, seq_len=32, batch_size=4,
                         max_steps=30, warmup_steps=2, eval_interval=10, eval_steps=2, log_interval=1,
                         num_threads=1, progress=False)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config.to_dict()


@pytest.fixture
def real_daemon(server):
    """The module's daemon running the real `python -m llmos.cli.train_cmd`."""
    from llmos.server.jobs import TRAIN_COMMAND

    jobs = server.state.jobs
    before = jobs.command, jobs.suspend_timeout_s
    jobs.command, jobs.suspend_timeout_s = TRAIN_COMMAND, 120.0
    yield server
    jobs.command, jobs.suspend_timeout_s = before


def test_real_trainer_job_shows_progress_finishes_and_its_checkpoint_loads(real_daemon, tmp_path, monkeypatch):
    """The whole path from the shell: `llmos train --detach` -> the job in `llmos ps` with its progress -> finished
    -> the run directory loads as a model."""
    from llmos.model.loader import load_model

    monkeypatch.setenv("LLMOS_HOST", real_daemon.url)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog {i % 7}."
                                                    for i in range(400)))
    submitted = llmos("train", "--detach", "--data", "corpus.txt", "--out", "out", "--vocab-size", "300",
                      "--hidden-size", "32", "--layers", "2", "--heads", "2", "--kv-heads", "2", "--intermediate-size",
                      "64", "--seq-len", "32", "--batch-size", "4", "--max-steps", "200", "--warmup-steps", "2",
                      "--eval-interval", "50", "--eval-steps", "2", "--log-interval", "1", "--threads", "1")
    assert submitted.exit_code == 0, submitted.output
    name = submitted.stdout.strip()

    def shown():
        listed = llmos("ps", "--all")
        assert listed.exit_code == 0, listed.output
        cols = next((x.split() for x in listed.stdout.splitlines() if x.split()[:1] == [name]), None)
        return cols if cols and cols[3] != "-" else None  # STEP is there

    cols = wait_for(shown, 300, 0.2)
    assert cols[2] in ("running", "yielding", "finished") and cols[3].endswith("/200"), cols
    with httpx.Client(base_url=real_daemon.url, timeout=120) as api:
        done = wait_state(api, name, "finished", "failed", "killed", timeout=300)
        assert done["state"] == "finished", api.get(f"/v1/jobs/{name}/log").text
        assert done["progress"]["step"] == 200 and done["progress"]["state"] == "finished"
    model, config = load_model(tmp_path / "out")
    assert config.num_layers == 2 and config.hidden_size == 32


def test_real_trainer_job_suspends_resumes_logs_and_is_killed(real_daemon, tmp_path):
    with httpx.Client(base_url=real_daemon.url, timeout=300) as api:
        row = submit_config(api, tiny_train_config(tmp_path, max_steps=400, save_interval=0))
        wait_for(lambda: ((job(api, row["id"])["progress"] or {}).get("step") or 0) >= 2, 300)
        held = api.post(f"/v1/jobs/{row['id']}/suspend").json()
        assert held["state"] == "suspended", (held, api.get(f"/v1/jobs/{row['id']}/log").text)
        assert held["exit_code"] == 0 and held["progress"]["state"] == "suspended"
        assert (tmp_path / "out" / "checkpoints" / "last").is_dir()
        step = held["progress"]["step"]
        api.post(f"/v1/jobs/{row['id']}/resume")
        wait_for(lambda: ((job(api, row["id"])["progress"] or {}).get("step") or 0) > step, 300)
        killed = api.delete(f"/v1/jobs/{row['id']}").json()
        assert killed["state"] == "killed" and not pid_alive(killed["pid"])
        log = api.get(f"/v1/jobs/{row['id']}/log").text
        assert log.count("--- llmos: job") == 2 and "--resume" in log


def submit_config(api, config: dict) -> dict:
    r = api.post("/v1/jobs", json={"config": config})
    assert r.status_code == 201, r.text
    return r.json()


def test_real_trainer_sigterm_to_llmos_serve_suspends_its_jobs(tmp_path):
    """`llmos serve` as a process: SIGTERM suspends the running job at a checkpoint before the daemon exits."""
    port = _conftest.free_port()
    env = dict(os.environ, LLMOS_HOME=str(tmp_path / "home"))
    with open(tmp_path / "serve.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "llmos.cli.main", "serve", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 120, 0.2)
        with httpx.Client(base_url=url, timeout=120) as api:
            row = submit_config(api, tiny_train_config(tmp_path, max_steps=5000))
            running = wait_for(lambda: (r := job(api, row["id"]))["state"] == "running"
                               and ((r["progress"] or {}).get("step") or 0) >= 2 and r, 300)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(10)
    stored = JobStore(tmp_path / "home" / "llmos.db").get(parse_job_id(row["id"]))
    assert stored.state == "suspended" and stored.exit_code == 0 and "the daemon shut down" in stored.note
    assert (tmp_path / "out" / "checkpoints" / "last").is_dir() and not pid_alive(running["pid"])


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=1).status_code == 200
    return False
