"""Training jobs in LLMOS_HOME/llmos.db (SQLite) beside the registry, the users and the sessions, and where each
job's files live (LLMOS_HOME/jobs/<id>/: config.yaml, the resolved training config, and log, its output).

Owns the `jobs` table and the job state machine's record: what state a job is in, how its child process ended,
and the start-up recovery of jobs a crashed daemon left "running". Never starts, signals or watches a process
(llmos.server.jobs does).

States: queued -> running -> finished | failed | killed | suspended; suspended -> queued (resume) -> running ...
A job id is shown as "j<N>" (`job_name`); `parse_job_id` also takes "N" and "job-N".
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmos.errors import LlmosError
from llmos.fs import db as sqlite_db
from llmos.fs import registry

STATES = ("queued", "running", "suspended", "finished", "failed", "killed")
LIVE_STATES = ("queued", "running", "suspended")  # a job in one of these still owns its out dir
ENDED_STATES = ("finished", "failed", "killed")
JOB_ID = re.compile(r"(?:j|job-?)?([1-9][0-9]{0,17})", re.IGNORECASE)
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, "
    "state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'suspended', 'finished', 'failed', 'killed')), "
    "config TEXT NOT NULL, out_dir TEXT NOT NULL, created REAL NOT NULL, started REAL, ended REAL, "
    "exit_code INTEGER, pid INTEGER, resume INTEGER NOT NULL DEFAULT 0, note TEXT, daemon INTEGER)",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, id)",
)
COLUMNS = "id, owner, state, config, out_dir, created, started, ended, exit_code, pid, resume, note, daemon"
UPDATABLE = frozenset(("state", "started", "ended", "exit_code", "pid", "resume", "note", "daemon"))


class JobsError(LlmosError):
    """A job request is invalid (unknown job, bad state), or llmos.db is unusable."""


@dataclass(frozen=True)
class Job:
    """One training job: `id` (an integer; shown as "j<id>"), `owner`, `state` (one of STATES), `config` (the
    resolved TrainConfig as a dict), `out_dir` (absolute path of its run directory), `created` / `started` / `ended`
    (Unix seconds; `started` is the latest launch, None before the first), `exit_code` (of the latest launch's
    process; negative: killed by that signal), `pid` (of the latest launch), `resume` (the next launch continues
    the out dir's checkpoints/last with --resume), `note` (why it is in its state, when that needs saying) and
    `daemon` (the pid of the daemon that launched it last)."""

    id: int
    owner: str
    state: str
    config: dict = field(hash=False)
    out_dir: str
    created: float
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    resume: bool = False
    note: str | None = None
    daemon: int | None = None

    @property
    def name(self) -> str:
        return job_name(self.id)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def job_name(job_id: int) -> str:
    """How a job id is shown and typed: "j<N>"."""
    return f"j{job_id}"


def parse_job_id(text: str | int) -> int | None:
    """The integer id in "j3", "job-3", "job3" or "3" (or 3); None for anything else."""
    if isinstance(text, int):
        return text if text > 0 else None
    m = JOB_ID.fullmatch(str(text).strip())
    return int(m.group(1)) if m else None


def is_job_ref(text: str) -> bool:
    """Whether `text` names a job explicitly ("j3", "job-3"), not just a number (a pid)."""
    return not str(text).strip().isdigit() and parse_job_id(text) is not None


class JobStore:
    """Jobs in one SQLite file (default: llmos.db in LLMOS_HOME, fixed at construction), with their folders beside
    it in jobs/<id>/.

    Same conventions as the other stores: a connection per call (any thread), writes in single `BEGIN IMMEDIATE`
    transactions, reads never create the file. Raises `JobsError` for an unknown job and an unusable database."""

    def __init__(self, db_path: str | Path | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else registry.db_path()

    def job_dir(self, job_id: int) -> Path:
        """The folder of job `job_id`: <LLMOS_HOME>/jobs/<id> (config.yaml, log)."""
        return self.db_path.parent / "jobs" / str(int(job_id))

    def create(self, owner: str, config: dict, out_dir: str) -> Job:
        """A new queued job of `owner` training `config` into `out_dir`."""
        now = time.time()
        text = json.dumps(config, sort_keys=True)
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO jobs (owner, state, config, out_dir, created) "
                               "VALUES (?, 'queued', ?, ?, ?)", (owner, text, out_dir, now))
            job_id = cur.lastrowid
        return Job(job_id, owner, "queued", config, out_dir, now)

    def get(self, job_id: int) -> Job | None:
        """Job `job_id`, or None."""
        rows = self._read(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (int(job_id),))
        return _job(rows[0]) if rows else None

    def list(self, owner: str | None = None, states: tuple[str, ...] | None = None) -> list[Job]:
        """`owner`'s jobs (None: everyone's), in one of `states` (None: any), oldest first."""
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += list(states)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return [_job(r) for r in self._read(f"SELECT {COLUMNS} FROM jobs{clause} ORDER BY id", tuple(args))]

    def claim(self, job_id: int, daemon: int) -> Job | None:
        """Mark queued job `job_id` running for daemon `daemon` (a pid), in one transaction; None when it is no
        longer queued (another daemon on this LLMOS_HOME took it, or it was killed or held meanwhile)."""
        with self._transaction() as conn:
            cur = conn.execute("UPDATE jobs SET state = 'running', started = ?, ended = NULL, exit_code = NULL, "
                               "pid = NULL, note = NULL, daemon = ? WHERE id = ? AND state = 'queued'",
                               (time.time(), daemon, int(job_id)))
            row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        return _job(row) if cur.rowcount == 1 else None

    def update(self, job_id: int, **fields) -> Job:
        """Set `fields` (state, started, ended, exit_code, pid, resume, note, daemon) of job `job_id`; returns it.
        Raises `JobsError` for an unknown job or state."""
        bad = set(fields) - UPDATABLE
        if bad:
            raise ValueError(f"JobStore.update: not updatable: {sorted(bad)}")
        if "state" in fields and fields["state"] not in STATES:
            raise JobsError(f"invalid job state {fields['state']!r}; one of {', '.join(STATES)}.")
        with self._transaction() as conn:
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), int(job_id)))
            row = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobsError(f"no job {job_name(job_id)}; GET /v1/jobs lists yours.")
        return _job(row)

    def recover(self, keep: frozenset[int] | set[int] = frozenset()) -> list[Job]:
        """After a daemon crash: every job left "running" (but those in `keep`: adopted, or another live daemon's)
        becomes "suspended" (resumable) when its out dir has checkpoints/last, else "failed"; each gets a note
        saying so. Returns the jobs it changed (as they are now). Queued and suspended jobs are left as they are."""
        changed = []
        for job in self.list(states=("running",)):
            if job.id in keep:
                continue
            if (Path(job.out_dir) / "checkpoints" / "last").is_dir():
                changed.append(self.update(job.id, state="suspended", resume=1, ended=time.time(),
                                           note="the daemon stopped while it ran; resume continues from its last "
                                                "checkpoint"))
            else:
                changed.append(self.update(job.id, state="failed", ended=time.time(),
                                           note="the daemon stopped while it ran, before any checkpoint; submit "
                                                "it again"))
        return changed

    # ---- the database ------------------------------------------------------------------------------

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        return sqlite_db.read(self.db_path, "jobs", query, args, _db_error)

    def _transaction(self):
        return sqlite_db.transaction(self.db_path, SCHEMA, _db_error)


def _job(row: tuple) -> Job:
    job_id, owner, state, config, out_dir, created, started, ended, exit_code, pid, resume, note, daemon = row
    return Job(job_id, owner, state, json.loads(config), out_dir, created, started, ended, exit_code, pid,
               bool(resume), note, daemon)


def _db_error(db: Path, e: Exception) -> JobsError:
    return JobsError(f"cannot use the llmos database {db} ({e}); if it is corrupt, move it aside (users, keys, "
                     "registered models, sessions and jobs are then gone), or set LLMOS_HOME to another folder.")
