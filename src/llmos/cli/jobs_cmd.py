"""Training jobs from the shell: `llmos train --detach` (`submit`), `llmos logs JOB [--follow]`, and the job side of
`llmos kill | suspend | resume JOB` (a job is named "j3"; a bare number is a pid).

Owns how a job is submitted (paths made absolute here, where the user typed them) and how job verbs are shown.
Never speaks HTTP itself (`llmos.cli.client` does) and never runs a trainer (the daemon does: llmos.server.jobs).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Annotated

import typer

from llmos.cli.main import notice, out, write
from llmos.cli.remote_cmd import Link, guarded, require
from llmos.errors import InvalidRequestError
from llmos.fs.jobs import job_name, parse_job_id

PATH_KEYS = ("out_dir", "tokenizer", "init_from", "shards_dir")
NO_DAEMON = ("no llmos daemon at {url}: `llmos train --detach` hands the run to a daemon as a job; start one with "
             "`llmos serve` (or set LLMOS_HOST), or train in the foreground without --detach.")


def absolute_config(config: dict) -> dict:
    """`config` with its data, out_dir, tokenizer, init_from and shards_dir paths absolute (the daemon runs the job
    from its own directory and accepts absolute paths only)."""
    config = dict(config)
    data = config.get("data") or []
    config["data"] = [os.path.abspath(os.path.expanduser(str(p))) for p in ([data] if isinstance(data, str) else data)]
    for key in PATH_KEYS:
        if config.get(key) is not None:
            config[key] = os.path.abspath(os.path.expanduser(str(config[key])))
    return config


def submit(config) -> None:
    """`llmos train --detach`: post `config` (a TrainConfig) to the daemon at LLMOS_HOST (with LLMOS_API_KEY) as a
    training job, and print its id ("j3") on stdout. Raises `DaemonUnreachableError` (exit 2) without a daemon and
    `DaemonError` when it refuses (e.g. 403: only an admin may submit jobs; 409: a live job writes that out dir).
    The paths are made absolute here; they name files on the daemon's machine."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    link = require(NO_DAEMON)
    row = guarded(link.client.submit_job)(absolute_config(as_dict))
    link.say()
    out.print(row["id"], markup=False)
    notice(f"job {row['id']} submitted ({row['state']}); `llmos ps` shows its progress, `llmos logs {row['id']} "
           f"--follow` its output")


def job_ref(text: str) -> str:
    """The canonical name ("j3") of a job argument ("j3", "job-3", "3"). Raises `InvalidRequestError`."""
    job_id = parse_job_id(text)
    if job_id is None:
        raise InvalidRequestError(f"{text!r} is not a job id; jobs are named like j3 (`llmos ps` lists them).")
    return job_name(job_id)


def progress_words(row: dict) -> str:
    """"at step 120/1000" from a job row's progress, or ""."""
    p = row.get("progress") or {}
    if isinstance(p.get("step"), int):
        total = p.get("total_steps")
        return f" at step {p['step']}" + (f"/{total}" if isinstance(total, int) else "")
    return ""


def kill(link: Link, job: str) -> None:
    """`llmos kill j3`: SIGKILL the job's processes on the daemon; its out dir keeps what was written."""
    row = link.client.kill_job(job_ref(job))
    link.say()
    notice(f"job {row['id']} killed{progress_words(row)}")


def suspend(link: Link, job: str) -> None:
    """`llmos suspend j3`: the job checkpoints and stops (returns once it has)."""
    row = link.client.suspend_job(job_ref(job))
    link.say()
    notice(f"job {row['id']} {row['state']}{progress_words(row)}" + (f" ({row['note']})" if row.get("note") else "")
           + (f"; `llmos resume {row['id']}` continues it" if row["state"] == "suspended" else ""))


def resume(link: Link, job: str) -> None:
    """`llmos resume j3`: queue a suspended job again; it continues from its checkpoint."""
    row = link.client.resume_job(job_ref(job))
    link.say()
    notice(f"job {row['id']} {row['state']}; `llmos ps` shows its progress")


@guarded
def logs_command(
    job: Annotated[str, typer.Argument(metavar="JOB", help="A job id (j3; `llmos ps` lists them).",
                                       show_default=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing its output while the job runs.")]
    = False,
) -> None:
    """Print a training job's output (stdout and stderr of every launch); with --follow, as it comes, until the job
    stops."""
    name = job_ref(job)
    link = require("no llmos daemon at {url}; training jobs run in a daemon (`llmos serve`, `llmos train --detach`).")
    with link.client.job_log(name, follow) as response:
        link.say()
        raw = getattr(sys.stdout, "buffer", None)
        for chunk in response.iter_bytes():
            if raw is not None:  # the log as it is, byte for byte
                raw.write(chunk)
                raw.flush()
            else:
                write(chunk.decode("utf-8", "replace"))
