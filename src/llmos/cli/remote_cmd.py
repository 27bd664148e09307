"""The shell verbs against a running daemon: choosing the daemon or an in-process kernel (and saying which on
stderr), `run`, `chat` and `resume` streamed from the daemon, `ps`, `top` (processes and training jobs), the loaded
models of `llmos models`, and the top-level process verbs kill, suspend, resume, hibernate, nice and fork (kill,
suspend and resume also take a job id like j3: cli/jobs_cmd.py).

Owns how a verb picks where it runs and how the daemon's answers are shown (with `llmos sh`'s tables). Never speaks
HTTP itself (`llmos.cli.client` does) and never drives a kernel (the in-process paths stay in main.py and shell.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.console import Group
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from llmos import fs
from llmos.cli.client import ConnectionLostError, DaemonClient, DaemonError, DaemonUnreachableError, EventStream
from llmos.cli.main import (CHAT_HELP, PLAIN_CHAT_STOP, Device, KVMemory, Local, err, notice, out, print_error,
                            print_stats, read_lines, write)
from llmos.errors import HibernationError, InvalidRequestError

if TYPE_CHECKING:
    from llmos.model.sampling import SamplingParams

EXIT_CONNECTION_LOST = 1
LIVE = ("NEW", "READY", "RUNNING", "SUSPENDED")


# ---- where a verb runs -----------------------------------------------------------------------------


@dataclass
class Link:
    """Where a verb runs: on the daemon behind `client`, or in-process (`client` None), and why."""

    client: DaemonClient | None
    url: str
    local: bool = False  # --local asked for in-process
    quiet: bool = False  # --no-stats: nothing on stderr but errors
    said: bool = False

    def say(self, what: str = "running in-process") -> None:
        """The one dim stderr line saying where the verb runs (`what` it does without a daemon). Printed once,
        when the verb has got going, so that an error before it stays the only line on stderr."""
        if self.said or self.quiet:
            return
        self.said = True
        if self.client is not None:
            notice(f"daemon at {self.url}")
        else:
            notice(f"--local: {what}" if self.local else f"no daemon at {self.url}: {what}")


def connect(local: bool = False, quiet: bool = False) -> Link:
    """The daemon at LLMOS_HOST (default `client.DEFAULT_URL`) when one answers, else in-process; `quiet`: the
    link says nothing (`run --no-stats`).

    Raises `DaemonUnreachableError` when LLMOS_HOST is set and nothing answers there: the user asked for that
    daemon, so running in-process instead would be a surprise."""
    client = DaemonClient.from_env()
    if local:
        return Link(None, client.url, local=True, quiet=quiet)
    why = client.probe()
    if why is None:
        return Link(client, client.url, quiet=quiet)
    client.close()
    if client.explicit:
        raise DaemonUnreachableError(f"no llmos daemon at {client.url} (LLMOS_HOST): {why}; start it with "
                                     "`llmos serve`, fix LLMOS_HOST, or unset it (or pass --local) to run in-process.")
    return Link(None, client.url, quiet=quiet)


def require(why_needed: str | None = None) -> Link:
    """The daemon, for a verb that has no in-process meaning. Raises `DaemonUnreachableError` without one."""
    client = DaemonClient.from_env()
    if client.probe() is not None:
        client.close()
        raise DaemonUnreachableError(why_needed.format(url=client.url) if why_needed else
                                     f"no llmos daemon at {client.url}; start one with `llmos serve`, or use "
                                     "`llmos sh` for an in-process kernel.")
    return Link(client, client.url)


def guarded(verb: Callable) -> Callable:
    """`verb`, with a daemon that goes away in the middle turned into one `error:` line and exit status 1."""
    @functools.wraps(verb)
    def wrapper(*args, **kwargs):
        try:
            return verb(*args, **kwargs)
        except ConnectionLostError as e:
            print_error(str(e))
            raise typer.Exit(EXIT_CONNECTION_LOST) from None
    return wrapper


def daemon_model(client: DaemonClient, model: str | None) -> str:
    """The daemon's name for a `--model` value. None: the daemon's only loaded model, else the bundled one
    ("default"). A checkpoint directory: "default" for the bundled one, its registered name, else its directory
    name (as `llmos serve --model DIR` names it). Anything else is a name already."""
    if model is None:
        loaded = client.health().get("models", [])
        return loaded[0] if len(loaded) == 1 else fs.DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    path = path.resolve()
    if path == fs.default_model_dir().resolve():
        return fs.DEFAULT_MODEL_NAME
    return next((e.name for e in fs.list_models() if e.path.resolve() == path), path.name)


def sampling_json(params: SamplingParams) -> dict:
    """The sampling fields of a daemon request (native API, sessions) from validated `SamplingParams`."""
    return {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "min_p": params.min_p, "repetition_penalty": params.repetition_penalty,
            "seed": params.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos}


# ---- streaming a process ---------------------------------------------------------------------------


@dataclass
class Followed:
    """What following a process wrote: its new output tokens, when the first came and the stream ended
    (perf_counter seconds), how it ended, and its image id if we hibernated it."""

    token_ids: list[int]
    first_at: float | None
    ended_at: float
    finish_reason: str | None
    hid: str | None = None


def follow(client: DaemonClient, events: EventStream, pid: int, hibernate_after: int | None = None) -> Followed:
    """Write process `pid`'s text from `events` to stdout until its stream ends.

    `hibernate_after`: once it has that many new output tokens, hibernate it (the daemon's engine runs on
    meanwhile, so the image may hold a few more; their text is written too, so stdout is exactly the image's
    text)."""
    new: list[int] = []
    first_at, reason, hid = None, None, None
    for e in events:
        text, ids = e.get("text", ""), e.get("token_ids", [])
        if ids and first_at is None:
            first_at = time.perf_counter()
        new += ids
        write(text)
        if e.get("finished"):
            reason = e.get("finish_reason")
        elif hibernate_after is not None and hid is None and len(new) >= hibernate_after:
            hid = hibernate_live(client, pid)
    return Followed(new, first_at, time.perf_counter(), reason, hid)


def hibernate_live(client: DaemonClient, pid: int) -> str | None:
    """Hibernate `pid`; None when it ended just before (the stream then says how)."""
    try:
        return client.hibernate(pid)
    except DaemonError:
        with contextlib.suppress(DaemonError):
            if client.process(pid)["state"] not in LIVE:
                return None
        raise


def tell_hibernated(hid: str) -> None:
    """Say on stderr how to continue image `hid` (as `llmos run --hibernate-after` does in-process)."""
    if sys.stdout.isatty():  # end the text's line; piped, stdout stays exactly the text so far
        write("\n")
    err.print(f"hibernated as {hid}; continue with: llmos resume {hid}", soft_wrap=True, markup=False)


@dataclass
class RemoteResult:
    """The fields of `syscalls.Result` that `print_stats` shows, for a process on the daemon."""

    token_ids: list[int]
    prompt_tokens: int | str
    ttft_s: float | None
    total_s: float
    finish_reason: str | None


@guarded
def run(link: Link, prompt: str, params: SamplingParams, model: str | None, stats: bool,
        hibernate_after: int | None) -> None:
    """`llmos run` on the daemon: spawn with a stream, write the text as it comes; Ctrl-C closes the stream, and
    the daemon kills the process."""
    client = link.client
    started = time.perf_counter()
    with client.spawn_stream(daemon_model(client, model), prompt, sampling_json(params)) as events:
        link.say()
        done = follow(client, events, events.pid, hibernate_after)
    if done.hid is not None:
        tell_hibernated(done.hid)
        return
    write("\n")
    if stats:
        try:
            prompt_tokens = client.process(events.pid)["prompt_tokens"]
        except DaemonError:  # reaped already
            prompt_tokens = "-"
        print_stats(RemoteResult(done.token_ids, prompt_tokens,
                                 done.first_at - started if done.first_at is not None else None,
                                 done.ended_at - started, done.finish_reason))


# ---- chat --------------------------------------------------------------------------------------------


@guarded
def chat(link: Link, model: str | None, system: str | None, params: SamplingParams) -> None:
    """`llmos chat` on the daemon: one session (kept there, with its history and K/V), /reset starts another."""
    client = link.client
    name = daemon_model(client, model)
    body = sampling_json(params)
    body["stop"].append(PLAIN_CHAT_STOP)  # as in-process for a model without a chat template; harmless with one
    sid = client.create_session(name, system)["id"]
    link.say()
    notice(f"chatting with {name} in session {sid} on the daemon; /help lists commands, /exit quits")
    for line in read_lines():
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                sid = client.create_session(name, system)["id"]
                notice(f"conversation cleared: new session {sid}")
            elif command == "/help":
                (out if sys.stdin.isatty() else err).print(CHAT_HELP, markup=False)
            else:
                print_error(f"unknown command {command}; /help lists the commands.")
        elif line.strip():
            chat_turn(client, sid, line, body)


def chat_turn(client: DaemonClient, sid: str, text: str, body: dict) -> None:
    """One exchange in session `sid`; a refused message (e.g. too long) is reported, not fatal."""
    try:
        with client.send_message(sid, text, body) as events:
            if sys.stdin.isatty():
                out.print("[bold cyan]llm>[/] ", end="")
            for e in events:
                if "message" not in e:  # the last event is the stored message; its text was streamed
                    write(e.get("text", ""))
    except DaemonError as e:
        print_error(str(e))
        return
    except KeyboardInterrupt:  # Ctrl-C stops this reply (the daemon kills it), not the chat
        write("\n")
        notice("reply interrupted; the session keeps neither message (/exit quits)")
        return
    write("\n")


# ---- models ------------------------------------------------------------------------------------------


def models_listing(local: bool) -> Table:
    """`llmos models`: the registry, and with a daemon which of them are loaded and the memory each holds
    (models the daemon loaded from elsewhere get rows of their own)."""
    from llmos.cli.main import model_rows, models_table

    rows: list[tuple[str, Path | None]] = list(model_rows())  # a corrupt registry fails before any note
    link = connect(local)
    if link.client is None:
        link.say("loaded models unknown")
        return models_table(rows)
    resident = guarded(link.client.loaded_models)()
    link.say()
    by_name = {m["name"]: m for m in resident}
    by_path = {Path(m["path"]).resolve(): m for m in resident if m.get("path")}
    matched, cells = set(), []
    for name, path in rows:
        m = by_name.get(name) or by_path.get(path.resolve())
        if m is not None:
            matched.add(m["name"])
        cells.append(loaded_cells(m))
    for m in resident:
        if m["name"] not in matched:
            rows.append((m["name"], Path(m["path"]) if m.get("path") else None))
            cells.append(loaded_cells(m))
    return models_table(rows, cells)


def loaded_cells(m: dict | None) -> tuple[str, str]:
    """The `loaded` and `memory` cells of a model the daemon has loaded (`m`, its row) or has not (None)."""
    if m is None:
        return "no", "-"
    return ("pinned" if m.get("pinned") else "yes"), (decimal(m["bytes"]) if m.get("bytes") else "-")


# ---- ps and top ----------------------------------------------------------------------------------------

OwnerOpt = Annotated[Optional[str], typer.Option(
    "--owner", help="Whose hibernated processes (default: yours; in-process: local).", show_default=False)]


@guarded
def ps_command(
    every: Annotated[bool, typer.Option("-a", "--all", help="Also the ended processes (on a daemon).")] = False,
    owner: OwnerOpt = None,
    local: Local = False,
) -> None:
    """List processes: a daemon's live ones (as `llmos sh`'s ps), its training jobs, and your hibernated ones on
    disk."""
    from llmos.cli.shell import hibernated_table, jobs_table, ps_table

    link = connect(local)
    if link.client is None:
        from llmos.kernel.hibernate import default_store

        owner = owner or "local"
        images = default_store().list(owner)
        link.say("hibernated processes only; live ones are in a daemon (`llmos serve`) or in `llmos sh`")
    else:
        rows = link.client.processes(finished=every)
        jobs = link.client.jobs(finished=every)
        images = link.client.hibernated(owner)
        link.say()
        if rows:
            out.print(ps_table(rows))
        else:
            notice("no live processes" if not every else "no processes")
        if jobs:
            out.print(jobs_table(jobs))
    if images:
        out.print(hibernated_table(images))
    else:
        notice(f"no hibernated processes of owner {owner!r}" if owner else "no hibernated processes")


@guarded
def top_command(
    interval: Annotated[float, typer.Option("--interval", min=0.0, max=3600.0,
                                            help="Seconds between refreshes (0 to 3600).")] = 1.0,
    iterations: Annotated[Optional[int], typer.Option(
        "--iterations", min=1, help="Stop after N refreshes (default: Ctrl-C on a terminal; once idle when piped).",
        show_default=False)] = None,
) -> None:
    """Watch a daemon's kernels: memory, prefix cache, processes and training jobs, refreshed every --interval
    seconds."""
    link = require("no llmos daemon at {url}, and outside `llmos sh` there is no live kernel to watch; start one "
                   "with `llmos serve`, or run `top` inside `llmos sh`.")
    frame, busy = top_frame(link)
    link.say()
    from llmos.cli.shell import watch

    def advance():
        time.sleep(interval)
        return top_frame(link)

    watch(frame, busy, advance, iterations)


def top_frame(link: Link) -> tuple[Group, bool]:
    """One `top` screen of the daemon (the head line, each loaded model's memory, the process table, the jobs
    table), and whether any process is live or any job queued or running."""
    from llmos.cli.shell import jobs_table, memory_table, ps_table

    rows = link.client.processes()
    jobs = link.client.jobs()
    memory = link.client.memory()
    states = [r["state"] for r in rows]
    head = Text.assemble(("llmos top", "bold"), f" - daemon at {link.url}, {len(memory)} model(s) loaded, "
                         f"{states.count('RUNNING')} running, {states.count('READY') + states.count('NEW')} waiting, "
                         f"{states.count('SUSPENDED')} suspended, {time.strftime('%H:%M:%S')}")
    parts: list = [head]
    for name, m in memory.items():
        parts += [Text(""), Text(f"model {name}", style="bold"), memory_table(m)]
    parts += [Text(""), ps_table(rows)]
    if jobs:
        parts += [Text(""), jobs_table(jobs)]
    return Group(*parts), bool(rows) or any(j["state"] in ("queued", "running") for j in jobs or ())


# ---- the process verbs -------------------------------------------------------------------------------------

Pid = Annotated[int, typer.Argument(help="A process id on the daemon (`llmos ps` lists them).", show_default=False)]
PidOrJob = Annotated[str, typer.Argument(
    metavar="PID|JOB", help="A process id, or a training job id like j3 (`llmos ps` lists both).", show_default=False)]


def pid_or_job(target: str) -> int | str:
    """A pid (int) or a job id ("j3"). Raises `InvalidRequestError` for anything else."""
    from llmos.fs.jobs import is_job_ref, job_name, parse_job_id

    if target.strip().isdigit():
        return int(target)
    if is_job_ref(target):
        return job_name(parse_job_id(target))
    raise InvalidRequestError(f"{target!r} is neither a pid nor a job id (like j3); `llmos ps` lists both.")


@guarded
def kill_command(target: PidOrJob) -> None:
    """End a process on the daemon (its KV blocks are free at once), or kill a training job."""
    what = pid_or_job(target)
    link = require()
    if isinstance(what, str):
        from llmos.cli import jobs_cmd

        return jobs_cmd.kill(link, what)
    link.client.kill(what)
    link.say()


@guarded
def suspend_command(target: PidOrJob) -> None:
    """Stop scheduling a process on the daemon (its K/V go to host swap, or are recomputed on resume), or
    checkpoint and stop a training job."""
    what = pid_or_job(target)
    link = require()
    if isinstance(what, str):
        from llmos.cli import jobs_cmd

        return jobs_cmd.suspend(link, what)
    link.client.suspend(what)
    link.say()


@guarded
def hibernate_command(pid: Pid) -> None:
    """Write a process on the daemon to disk and end it there; prints the image id (`llmos resume HID`)."""
    link = require()
    hid = link.client.hibernate(pid)
    link.say()
    out.print(hid, markup=False)


@guarded
def nice_command(pid: Pid, level: Annotated[int, typer.Argument(
        help="-20 (most favoured) .. 19 (least).", show_default=False)]) -> None:
    """Set the nice level of a process on the daemon (under the priority policy, lower runs first)."""
    link = require()
    link.client.renice(pid, level)
    link.say()


nice_command.context_settings = {"ignore_unknown_options": True}  # `nice 3 -5`: -5 is a level, not an option


@guarded
def fork_command(pid: Pid, n: Annotated[int, typer.Argument(help="How many children.")] = 1) -> None:
    """Make n children of a process on the daemon that continue from where it is; prints their pids."""
    link = require()
    children = link.client.fork(pid, n)
    link.say()
    out.print(" ".join(map(str, children)), markup=False)


@guarded
def resume_command(
    target: Annotated[str, typer.Argument(
        metavar="PID|HID|JOB", help="A suspended process on the daemon, a hibernated image id, or a suspended "
        "training job (j3) (`llmos ps` lists them).", show_default=False)],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="The model it ran on (default: found by the name in the image).",
        show_default=False)] = None,
    owner: OwnerOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, help="In-process: run at most N kernel steps, then hibernate it again.",
        show_default=False)] = None,
    hibernate_after: Annotated[Optional[int], typer.Option(
        "--hibernate-after", min=1, help="After N more output tokens, hibernate it again.", show_default=False)] = None,
    kv_memory: KVMemory = "0.25",
    device: Device = None,
    stats: Annotated[bool, typer.Option(
        "--stats/--no-stats", help="Print on stderr where it runs and, at the end, token counts and tokens/s.")] = True,
    local: Local = False,
) -> None:
    """Resume a suspended process on the daemon, or continue a hibernated one (on the daemon when one is running,
    else in-process), streaming the rest of its text; or queue a suspended training job again."""
    from llmos.fs.jobs import is_job_ref

    if is_job_ref(target):
        from llmos.cli import jobs_cmd

        link = require()
        return jobs_cmd.resume(link, target)
    if target.isdigit():
        if local:
            raise InvalidRequestError(f"{target} is a pid, and pids name processes in a daemon; --local has none "
                                      "(`llmos sh` resumes its own).")
        link = require()
        link.client.resume(int(target))
        link.say()
        return
    link = connect(local, quiet=not stats)
    if link.client is None:
        from llmos.cli.shell import resume_local

        resume_local(target, model, owner or "local", max_steps, hibernate_after, kv_memory, device, stats, link.say)
        return
    if max_steps is not None:
        raise InvalidRequestError("--max-steps counts the steps of an in-process kernel; on a daemon use "
                                  "--hibernate-after N (or --local to resume it in-process).")
    restore_and_stream(link, target, model, owner, hibernate_after, stats)


def restore_and_stream(link: Link, hid: str, model: str | None, owner: str | None, hibernate_after: int | None,
                       stats: bool) -> None:
    """`llmos resume HID` on the daemon: restore the image there and stream the rest of its text (attach);
    Ctrl-C kills it, as in-process."""
    client = link.client
    entry = next((e for e in client.hibernated(owner) if e["hid"] == hid), None)
    if entry is None:
        raise HibernationError(f"no hibernated process {hid} on the daemon at {link.url}; `llmos ps` lists them.")
    if entry["status"] != "ok":
        raise HibernationError(entry["error"])
    before = entry["output_tokens"]
    pid = client.restore(hid, daemon_model(client, model) if model is not None else None, owner)["pid"]
    link.say()
    started = time.perf_counter()
    try:
        with client.attach(pid, new=True) as events:  # only the text generated after the restore
            done = follow(client, events, pid, hibernate_after)
    except KeyboardInterrupt:
        with contextlib.suppress(DaemonError, ConnectionLostError):
            client.kill(pid)
        raise
    if done.hid is not None:
        tell_hibernated(done.hid)
        return
    write("\n")
    if stats:
        more, elapsed = len(done.token_ids), done.ended_at - started
        rate = f"{more / elapsed:.1f} tokens/s" if more and elapsed > 0 else "- tokens/s"
        err.print(f"resumed {hid} as pid {pid}: {more} more output tokens ({before + more} in all), {rate}, "
                  f"finish: {done.finish_reason}", style="dim", soft_wrap=True, markup=False)


