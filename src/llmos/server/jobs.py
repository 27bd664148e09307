"""Training as OS jobs (/v1/jobs): the daemon runs `llmos train` runs as child processes it starts, watches,
suspends, resumes and kills, and gives interactive inference priority over them.

Owns the job processes (`JobManager`) and the job endpoints. The record of each job lives in SQLite
(llmos.fs.jobs); its files in LLMOS_HOME/jobs/<id>/ (config.yaml, the resolved config; log, stdout + stderr of every
launch, appended). Never trains (the child runs `python -m llmos.cli.train_cmd`) and never parses a trainer's output
beyond its run directory's progress.json.

A job's process: `nice -n 10 python -m llmos.cli.train_cmd --config <job dir>/config.yaml [--resume]`, in its own
session (process group, so a Ctrl-C of the daemon's terminal never reaches it), stdout and stderr to the log.
  suspend  SIGUSR1 to it ("checkpoint and stop": it writes <out>/checkpoints/last and exits 0), then wait; after
           `suspend_timeout_s` seconds the group gets SIGKILL and the job is suspended at its last checkpoint if it
           has one (the note says so), else failed.
  resume   queue it again; it starts with --resume (continuing <out>/checkpoints/last exactly).
  kill     SIGKILL to the whole group; the job ends as killed (its out dir keeps what was written).
At most `max_running` jobs (default 1) run at once; the others wait as queued, oldest first.

Interactive priority (the rule): while any loaded model's kernel has a running or waiting process, every running
job is paused with SIGSTOP to its process group ("yielding" in ps: it holds its memory but uses no CPU or GPU
time); once the kernels have been idle for `grace_s` seconds (0.5 s) the jobs get SIGCONT. Checked every `poll_s`
seconds (0.05 s), so a generation waits at most about that long for the CPU.

Daemon shutdown suspends every running job (checkpoints) before the daemon exits; queued and suspended jobs stay so.
At start-up, a job a crashed daemon left "running" whose trainer is still alive gets SIGUSR1 and is adopted until it
exits; the others become suspended when their out dir has checkpoints/last, else failed.

Security: a job reads data paths and writes its out dir on the daemon's machine as the daemon's OS user, so only an
admin (everyone, in single-user mode) may submit one, and every path in its config must be absolute. A user sees and
controls only their own jobs (another user's job is a 404, as an unknown one); an admin sees all with ?all=true.

Endpoints (JSON; errors are app.py's):
  POST   /v1/jobs                    {config: TrainConfig.to_dict()} -> 201 row (admins only)
  GET    /v1/jobs[?finished=&all=]   -> {jobs: [row...]} (live ones: queued, running, suspended; finished=true: all)
  GET    /v1/jobs/{job}              -> row + config
  POST   /v1/jobs/{job}/suspend      -> row (waits until it has checkpointed and stopped); 409 unless queued/running
  POST   /v1/jobs/{job}/resume       -> row (queued); 409 unless suspended
  DELETE /v1/jobs/{job}              -> row (killed); 409 for an ended job
  GET    /v1/jobs/{job}/log[?follow=true&offset=N]   text/plain; with follow, streamed as it grows until the job
                                     is no longer queued or running.
`{job}` is "j3" (also "3" or "job-3"). A row: {id: "j3", owner, state, yielding, out_dir, created, started, ended,
exit_code, pid, note, progress: <out>/progress.json as written by this job's runs, or null}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from llmos.fs.jobs import ENDED_STATES, LIVE_STATES, Job, JobStore, job_name, parse_job_id
from llmos.server.app import ApiError, Principal, ServerState, principal

log = logging.getLogger("llmos.server")

router = APIRouter(tags=["jobs"])

TRAIN_COMMAND = (sys.executable, "-m", "llmos.cli.train_cmd")
NICE = 10
PATH_KEYS = ("out_dir", "tokenizer", "init_from", "shards_dir")  # config paths that must be absolute when set
LOG_CHUNK = 64 * 1024


class ConflictError(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(409, "conflict", message)


@dataclass
class Run:
    """One live launch of a job. `proc`: the child (None for an orphan adopted after a daemon crash, known by
    `pid` only). `stopping`: SIGUSR1 was sent (suspend or shutdown), with `deadline` (monotonic seconds) before
    SIGKILL; `killing`: SIGKILL was sent by a kill; `yielded`: SIGSTOPped for interactive inference; `done` is set
    once the job's record says how it ended."""

    job_id: int
    pid: int
    proc: subprocess.Popen | None = None
    stopping: bool = False
    deadline: float | None = None
    killing: bool = False
    timed_out: bool = False
    yielded: bool = False
    why: str = ""  # why it is stopping ("suspended", "the daemon shut down", ...)
    done: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> int | None | bool:
        """Its exit status once it has ended (None while it runs; for an orphan, False once it has ended)."""
        if self.proc is not None:
            return self.proc.poll()
        return None if pid_alive(self.pid) else False

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def read_progress(job: Job) -> dict | None:
    """<out>/progress.json if this job's runs wrote it (not older than the job), else None."""
    path = Path(job.out_dir) / "progress.json"
    try:
        if path.stat().st_mtime < job.created - 1:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_config(config: object) -> dict:
    """The submitted training config, checked for what the daemon needs: a JSON object with an absolute `out_dir`,
    absolute `data` paths and absolute tokenizer / init_from / shards_dir when set (the trainer validates the rest
    and a bad value fails the job, with the reason in its log). Raises a 400 ApiError."""
    def bad(message: str):
        raise ApiError(400, "invalid_request_error", message)

    if not isinstance(config, dict):
        bad("config must be a JSON object: a TrainConfig as a dict (TrainConfig.to_dict()).")
    config = dict(config)
    if not isinstance(config.get("out_dir"), str) or not config["out_dir"]:
        bad("config.out_dir is required: the absolute path of the run directory on the daemon's machine.")
    data = config.get("data", [])
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, str) and d for d in data):
        bad("config.data must be a list of paths (files or folders) on the daemon's machine.")
    config["data"] = data
    for key in ("data",) + PATH_KEYS:
        for value in (config.get(key) if key == "data" else [config.get(key)]):
            if value is None:
                continue
            if not isinstance(value, str) or not os.path.isabs(value):
                bad(f"config.{key} = {value!r} is not an absolute path; the daemon runs jobs from its own directory, "
                    "so give absolute paths (`llmos train --detach` resolves them for you).")
    try:
        json.dumps(config, allow_nan=False)
    except (ValueError, RecursionError) as e:
        bad(f"config cannot be saved as JSON ({e}); send finite numbers and plain settings (TrainConfig.to_dict()).")
    return config


class JobManager:
    """The daemon's training jobs: starts queued ones (at most `max_running` at once), watches their exits, reads
    their progress, suspends / resumes / kills them, and pauses them while `busy()` (interactive inference has
    work; see the module docstring for the rule). `command`: the trainer command the job's `--config PATH
    [--resume]` is appended to (tests point it at a stand-in; production runs llmos.cli.train_cmd).

    Times in seconds. A monitor thread does the reaping, starting and pausing every `poll_s`, while a job is queued
    or running (`wake` starts it)."""

    def __init__(self, store: JobStore, busy: Callable[[], bool] = lambda: False, *, max_running: int = 1,
                 suspend_timeout_s: float = 300.0, grace_s: float = 0.5, poll_s: float = 0.05,
                 command: tuple[str, ...] = TRAIN_COMMAND) -> None:
        self.store, self.busy = store, busy
        self.max_running, self.suspend_timeout_s, self.grace_s, self.poll_s = (max_running, suspend_timeout_s,
                                                                               grace_s, poll_s)
        self.command = tuple(command)
        self.runs: dict[int, Run] = {}
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._closing = False
        self._last_busy = float("-inf")
        self._thread: threading.Thread | None = None  # runs only while a job is queued or running

    # ---- life cycle ----------------------------------------------------------------------------------

    def start(self) -> JobManager:
        """Recover jobs a crashed daemon left running (not those of another live daemon on this LLMOS_HOME), then
        start the monitor thread."""
        others = {j.id for j in self.store.list(states=("running",))
                  if j.daemon not in (None, os.getpid()) and pid_alive(j.daemon)}
        self._adopt_orphans(others)
        for job in self.store.recover(keep=set(self.runs) | others):
            log.warning("job %s was running when the daemon stopped: now %s", job.name, job.state)
        self.wake()
        return self

    def shutdown(self) -> None:
        """Suspend every running job (SIGUSR1: checkpoint and stop), wait up to `suspend_timeout_s` (then SIGKILL),
        and stop the monitor. Queued and suspended jobs stay as they are."""
        with self.lock:
            self._closing = True
            runs = list(self.runs.values())
            for run in runs:
                if not run.stopping and not run.killing:
                    self._request_stop(run, "the daemon shut down")
        for run in runs:
            run.done.wait(self.suspend_timeout_s + 10)
        with self.lock:
            thread = self._thread
        if thread is not None:
            self._wake.set()
            thread.join(5)

    def _adopt_orphans(self, others: set[int]) -> None:
        """Trainers still alive from a daemon that crashed: ask each to checkpoint and stop, and watch it."""
        for job in self.store.list(states=("running",)):
            config = str(self.store.job_dir(job.id) / "config.yaml")
            if job.id in others or job.pid is None or not pid_alive(job.pid):
                continue
            try:
                cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if config.encode() not in cmdline:
                continue  # the pid was reused by something else
            run = Run(job.id, job.pid)
            with self.lock:
                self.runs[job.id] = run
                self._request_stop(run, "the daemon restarted while it ran")
            log.warning("job %s (pid %d) outlived a daemon crash; asked it to checkpoint and stop", job.name, job.pid)

    # ---- the verbs -----------------------------------------------------------------------------------

    def submit(self, owner: str, config: dict) -> Job:
        """A new queued job of `owner` (config checked by `check_config`); starts when a slot is free. Raises a
        409 ApiError when a live job already writes the same out dir."""
        config = check_config(config)
        out_dir = os.path.normpath(config["out_dir"])
        with self.lock:
            for other in self.store.list(states=LIVE_STATES):
                if os.path.normpath(other.out_dir) == out_dir:
                    raise ConflictError(f"job {other.name} ({other.state}) already writes {out_dir}; kill it or "
                                        "choose another --out.")
            job = self.store.create(owner, config, out_dir)
            folder = self.store.job_dir(job.id)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "config.yaml.tmp"
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # JSON is YAML
            os.replace(tmp, folder / "config.yaml")
        self.wake()
        return job

    def suspend(self, job_id: int) -> Job:
        """Checkpoint and stop a running job and wait until it has (blocking: call it from a worker thread); a
        queued one is held back (suspended without running). Raises a 409 ApiError in any other state."""
        with self.lock:
            job = self._job(job_id)
            if job.state == "queued":  # held back; a resumed one keeps its checkpoint and --resume
                return self.store.update(job.id, state="suspended",
                                         note=None if job.started else "suspended before it started")
            run = self.runs.get(job.id)
            if job.state != "running":
                raise ConflictError(f"job {job.name} is {job.state}; only a queued or running job can be suspended.")
            if run is None:
                raise ConflictError(self._elsewhere(job))
            if not run.stopping and not run.killing:
                self._request_stop(run, "suspended")
        run.done.wait(self.suspend_timeout_s + 30)
        return self._job(job_id)

    def resume(self, job_id: int) -> Job:
        """Queue a suspended job again: it continues from its checkpoint (with --resume) when a slot is free.
        Raises a 409 ApiError unless it is suspended."""
        with self.lock:
            job = self._job(job_id)
            if job.state != "suspended":
                raise ConflictError(f"job {job.name} is {job.state}; only a suspended job can be resumed.")
            job = self.store.update(job.id, state="queued", note=None)
        self.wake()
        return job

    def kill(self, job_id: int) -> Job:
        """End a job: SIGKILL to its process group when it runs (waits for it to be reaped). Raises a 409
        ApiError for a job that has already ended."""
        with self.lock:
            job = self._job(job_id)
            if job.state in ENDED_STATES:
                raise ConflictError(f"job {job.name} has already ended ({job.state}).")
            run = self.runs.get(job.id)
            if run is None and job.state == "running":
                raise ConflictError(self._elsewhere(job))
            if run is None:
                return self.store.update(job.id, state="killed", ended=time.time(), note="killed before it ran"
                                         if job.started is None else f"killed while {job.state}")
            run.killing = True
            run.signal_group(signal.SIGKILL)
        run.done.wait(30)
        return self._job(job_id)

    def row(self, job: Job, detail: bool = False) -> dict:
        """The JSON row of `job` (format in the module docstring); `detail` adds its config."""
        run = self.runs.get(job.id)
        out = {"id": job.name, "owner": job.owner, "state": job.state,
               "yielding": bool(run is not None and run.yielded and job.state == "running"),
               "out_dir": job.out_dir, "created": job.created, "started": job.started, "ended": job.ended,
               "exit_code": job.exit_code, "pid": job.pid, "note": job.note,
               "progress": read_progress(job) if job.started is not None else None}
        if detail:
            out["config"] = job.config
        return out

    def log_path(self, job_id: int) -> Path:
        return self.store.job_dir(job_id) / "log"

    def wake(self) -> None:
        """Run the monitor now: start it if it is not running (it stops itself when no job is queued or running)."""
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llmos-jobs", daemon=True)
                self._thread.start()
        self._wake.set()

    @staticmethod
    def _elsewhere(job: Job) -> str:
        return (f"job {job.name} is run by another llmos daemon (pid {job.daemon}) on this LLMOS_HOME; ask that "
                "one (its LLMOS_HOST).")

    def _job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no job {job_name(job_id)}; GET /v1/jobs lists yours.")
        return job

    # ---- the monitor -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                self._tick()
            except Exception:  # a bug here must not stop the monitor: the jobs would never be reaped
                log.exception("job monitor failed")
            with self.lock:
                if not self.runs and (self._closing or not self.store.list(states=("queued",))):
                    self._thread = None
                    return

    def _tick(self) -> None:
        with self.lock:
            for run in list(self.runs.values()):
                status = run.poll()
                if status is not None:
                    self._ended(run, None if status is False else status)
                elif run.stopping and not run.killing and run.deadline is not None \
                        and time.monotonic() > run.deadline:
                    run.timed_out, run.killing = True, True
                    run.signal_group(signal.SIGKILL)
            if not self._closing:
                self._start_queued()
                self._prioritize()

    def _prioritize(self) -> None:
        """SIGSTOP running jobs while interactive inference has work; SIGCONT them after `grace_s` idle."""
        now = time.monotonic()
        try:
            busy = bool(self.busy())
        except Exception:
            log.exception("the jobs' busy check failed")
            busy = False
        if busy:
            self._last_busy = now
        for run in self.runs.values():
            if run.stopping or run.killing:
                continue
            if busy and not run.yielded:
                run.signal_group(signal.SIGSTOP)
                run.yielded = True
            elif not busy and run.yielded and now - self._last_busy >= self.grace_s:
                run.signal_group(signal.SIGCONT)
                run.yielded = False

    def _start_queued(self) -> None:
        free = self.max_running - sum(1 for r in self.runs.values())
        if free <= 0:
            return
        for job in self.store.list(states=("queued",))[:free]:
            job = self.store.claim(job.id, os.getpid())
            if job is None:  # taken meanwhile
                continue
            try:
                self._launch(job)
            except OSError as e:  # the interpreter vanished, the log folder is not writable, ...
                log.exception("cannot start job %s", job.name)
                self.store.update(job.id, state="failed", ended=time.time(), note=f"cannot start: {e}")

    def _launch(self, job: Job) -> None:
        folder = self.store.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        argv = [*self.command, "--config", str(folder / "config.yaml")] + (["--resume"] if job.resume else [])
        nice = shutil.which("nice")
        preexec = None
        if nice:
            argv = [nice, "-n", str(NICE), *argv]
        else:  # no nice(1): lower the priority in the child (preexec_fn is a last resort in a threaded parent)
            def preexec() -> None:
                os.nice(NICE)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(folder / "log", "ab") as logf:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            logf.write(f"--- llmos: job {job.name} {'resumed' if job.resume else 'started'} at {stamp}: "
                       f"{' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=folder, env=env, start_new_session=True, preexec_fn=preexec)
        self.runs[job.id] = Run(job.id, proc.pid, proc)
        self.store.update(job.id, pid=proc.pid)
        log.info("job %s started (pid %d)%s", job.name, proc.pid, " with --resume" if job.resume else "")

    def _request_stop(self, run: Run, why: str) -> None:
        """SIGCONT (it may be paused) and SIGUSR1 to the trainer: checkpoint and stop; SIGKILL at the deadline."""
        run.stopping, run.why = True, why
        run.deadline = time.monotonic() + self.suspend_timeout_s
        run.signal_group(signal.SIGCONT)
        run.yielded = False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(run.pid, signal.SIGUSR1)  # the trainer itself; it stops its own workers or ranks

    def _ended(self, run: Run, status: int | None) -> None:
        """Record how `run` ended (status None: an adopted orphan, whose status nobody can read)."""
        run.signal_group(signal.SIGKILL)  # whatever the trainer left behind in its group
        job = self.store.get(run.job_id)
        if job is None:
            del self.runs[run.job_id]
            run.done.set()
            return
        progress = read_progress(job) or {}
        checkpoint = (Path(job.out_dir) / "checkpoints" / "last").is_dir()
        now = time.time()
        fields: dict = {"ended": now, "exit_code": status, "resume": 0}
        if run.killing and not run.timed_out:
            fields.update(state="killed", note="killed")
        elif status == 0 and progress.get("state") == "suspended" or \
                run.stopping and status in (0, None) and checkpoint and progress.get("state") != "finished":
            fields.update(state="suspended", resume=1, note=None if run.why == "suspended" else
                          f"{run.why}; resume continues from its checkpoint")
        elif status == 0 or status is None and progress.get("state") == "finished":
            fields.update(state="finished", note=None)
        elif run.stopping and checkpoint:
            late = (f"it did not checkpoint within {self.suspend_timeout_s:g} s and was killed; " if run.timed_out
                    else f"the trainer ended with status {status}; ")
            fields.update(state="suspended", resume=1,
                          note=f"{run.why}: {late}resume continues from its last saved checkpoint")
        else:
            if run.timed_out:
                why = f"it did not checkpoint within {self.suspend_timeout_s:g} s and was killed"
            elif status is None:
                why = "the daemon restarted while it ran and it left no checkpoint"
            elif status < 0:
                why = f"the trainer was killed by signal {signal.Signals(-status).name}"
            else:
                why = f"the trainer exited with status {status}"
            fields.update(state="failed", note=f"{why}; `llmos logs {job.name}` shows its output")
        job = self.store.update(job.id, **fields)  # if this fails, the next tick tries again
        del self.runs[run.job_id]
        log.info("job %s %s (exit status %s)", job.name, job.state, status)
        run.done.set()


# ---- the endpoints ------------------------------------------------------------------------------------------


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict


def get_jobs(request: Request) -> JobManager:
    return request.app.state.llmos.jobs


def setup(state: ServerState) -> None:
    """Create the daemon's JobManager (interactive inference: any loaded kernel with a running or waiting
    process), recover crashed jobs, and suspend running jobs at shutdown."""
    def busy() -> bool:
        return any(r.kernel.has_work() for r in list(state.models.resident.values()))

    state.jobs = JobManager(JobStore(), busy).start()
    state.shutdown_hooks.append(state.jobs.shutdown)


async def find_job(jobs: JobManager, who: Principal, job: str) -> Job:
    """Job `job` ("j3", "3", "job-3") if `who` may see it; another user's job is a 404, as an unknown one."""
    job_id = parse_job_id(job)
    found = await asyncio.to_thread(jobs.store.get, job_id) if job_id is not None else None
    if found is None or (found.owner != who.name and not who.is_admin):
        raise ApiError(404, "not_found", f"no job {job!r}; GET /v1/jobs lists yours (`llmos ps`).")
    return found


@router.post("/v1/jobs", status_code=201)
async def submit(body: SubmitRequest, who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    """Submit a training job (admins only: it reads and writes files as the daemon's OS user)."""
    if not who.is_admin:
        raise ApiError(403, "permission_error", f"submitting a training job needs an admin (a job reads and writes "
                       f"files on the daemon's machine as the daemon's user); user {who.name!r} is not one.")
    job = await asyncio.to_thread(jobs.submit, who.name, body.config)
    return jobs.row(job, detail=True)


@router.get("/v1/jobs")
async def list_jobs(finished: bool = False, everyone: bool = Query(False, alias="all"),
                    who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    """The caller's jobs: live ones (queued, running, suspended), with `finished` all; `all`: every owner's
    (admins only)."""
    if everyone and not who.is_admin:
        raise ApiError(403, "permission_error", f"all=true lists every user's jobs; user {who.name!r} is not an "
                       "admin.")
    found = await asyncio.to_thread(jobs.store.list, None if everyone else who.name,
                                    None if finished else LIVE_STATES)
    return {"jobs": [jobs.row(j) for j in found]}


@router.get("/v1/jobs/{job}")
async def get_job(job: str, who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    return jobs.row(await find_job(jobs, who, job), detail=True)


@router.post("/v1/jobs/{job}/suspend")
async def suspend_job(job: str, who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    """Checkpoint and stop a running job (returns once it has stopped); hold back a queued one."""
    found = await find_job(jobs, who, job)
    return jobs.row(await asyncio.to_thread(jobs.suspend, found.id))


@router.post("/v1/jobs/{job}/resume")
async def resume_job(job: str, who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    """Queue a suspended job again; it continues from its checkpoint."""
    found = await find_job(jobs, who, job)
    return jobs.row(await asyncio.to_thread(jobs.resume, found.id))


@router.delete("/v1/jobs/{job}")
async def kill_job(job: str, who: Principal = Depends(principal), jobs: JobManager = Depends(get_jobs)):
    """Kill a job (SIGKILL to its process group when it runs)."""
    found = await find_job(jobs, who, job)
    return jobs.row(await asyncio.to_thread(jobs.kill, found.id))


@router.get("/v1/jobs/{job}/log")
async def job_log(job: str, follow: bool = False, offset: int = Query(0, ge=0), who: Principal = Depends(principal),
                  jobs: JobManager = Depends(get_jobs)):
    """The job's output (stdout and stderr of every launch) from byte `offset`; with `follow`, streamed as it
    grows until the job is no longer queued or running."""
    found = await find_job(jobs, who, job)
    path = jobs.log_path(found.id)

    def read_from(pos: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                return f.read(LOG_CHUNK)
        except FileNotFoundError:
            return b""

    async def chunks() -> AsyncIterator[bytes]:
        pos = offset
        while True:
            live = (await asyncio.to_thread(jobs.store.get, found.id)).state in ("queued", "running")
            while data := await asyncio.to_thread(read_from, pos):  # drain, then decide: no output is lost
                pos += len(data)
                yield data
            if not follow or not live:
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
