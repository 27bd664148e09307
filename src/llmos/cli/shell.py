"""The kernel shell: `llmos sh` (a command loop around one in-process Kernel: spawn, ps, top, kill, suspend,
resume, hibernate, nice, fork ...), the in-process `llmos resume HID`, and the ps / top / memory tables that the
top-level verbs (cli/remote_cmd.py) also show for a daemon.

Owns reading shell lines (shlex splits them, a typer command group parses each command) and rendering processes and memory.
Never holds kernel logic: every process operation is a `llmos.kernel.syscalls` call; the shell only drives
the loop (`Kernel.step`) of the kernel it owns, as the daemon will.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Group
from rich.filesize import decimal
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmos import fs
from llmos.cli.main import (EXIT_INTERRUPTED, EXIT_USER_ERROR, Device, IgnoreEos, KVMemory, MaxTokens, MinP,
                            ModelOpt, RepetitionPenalty, Seed, Stop, Temperature, TopK, TopP, err, notice, out,
                            print_error, sampling_params, write)
from llmos.errors import HibernationError, InvalidRequestError, LlmosError, ModelLoadError, ProcessNotFoundError
from llmos.kernel import syscalls
from llmos.kernel.hibernate import HID_PATTERN, default_store
from llmos.kernel.kernel import Kernel, KernelConfig, resolve_device
from llmos.kernel.kvcache import parse_memory_budget

ENDED = ("FINISHED", "KILLED", "HIBERNATED")
STUCK_STEPS = 100  # idle steps in a row while there is work: the kernel cannot make progress
MiB = 2**20


class ExitShell(Exception):
    """`exit` / `quit`: leave the command loop."""


@dataclass
class Session:
    """One shell: its kernel, whose processes it acts on, and `$!` (the last pid or image id printed)."""

    kernel: Kernel
    owner: str
    admin: bool = False
    last: str | None = None

    @property
    def caller(self) -> str | None:
        """The owner the verbs act as: the shell's own, or every owner's (None) in an --admin shell."""
        return None if self.admin else self.owner


# ---- driving the kernel ----------------------------------------------------------------------------


def process_row(kernel: Kernel, pid: int, owner: str | None) -> dict:
    """The `ps` row of the caller's process `pid`, live or ended. Raises `ProcessNotFoundError`."""
    for row in syscalls.ps(kernel, owner, all=True):
        if row["pid"] == pid:
            return row
    raise ProcessNotFoundError(f"no process with pid {pid}; `ps -a` lists them.")


def step(kernel: Kernel, n: int | None, until=None) -> tuple[int, int]:
    """Run up to `n` kernel steps (None: no limit) while there is work and `until()` is false.
    Returns (steps, tokens computed). Raises `InvalidRequestError` when the kernel has work it cannot make
    progress on."""
    steps = tokens = idle = 0
    while (n is None or steps < n) and kernel.has_work() and not (until and until()):
        computed = kernel.step()
        steps, tokens = steps + 1, tokens + computed
        idle = idle + 1 if computed == 0 else 0
        if idle >= STUCK_STEPS:
            raise InvalidRequestError(f"the kernel made no progress in {STUCK_STEPS} steps (every waiting process "
                                      "is blocked, e.g. by its owner's block limit); kill or suspend one.")
    return steps, tokens


def stream_until(kernel: Kernel, pid: int, owner: str, more_tokens: int | None = None,
                 max_steps: int | None = None) -> bool:
    """Write `pid`'s text to stdout as the kernel computes it, until it ends (True) or it has `more_tokens` more
    output tokens or `max_steps` steps ran (False: it is still live)."""
    start = process_row(kernel, pid, owner)["output_tokens"]
    steps = 0
    while True:
        for delta in kernel.read(pid):
            write(delta)
        row = process_row(kernel, pid, owner)
        if row["state"] in ENDED:
            return True
        if more_tokens is not None and row["output_tokens"] - start >= more_tokens:
            return False
        if (max_steps is not None and steps >= max_steps) or step(kernel, 1) == (0, 0):
            return False
        steps += 1


def hibernate_and_tell(kernel: Kernel, pid: int, owner: str) -> str:
    """Hibernate a live process and say on stderr how to continue it; returns the image id."""
    hid = syscalls.hibernate(kernel, pid, owner)
    if sys.stdout.isatty():  # end the text's line; piped, stdout stays exactly the text so far
        write("\n")
    err.print(f"hibernated as {hid}; continue with: llmos resume {hid}"
              + (f" --owner {shlex.quote(owner)}" if owner != "local" else ""), soft_wrap=True, markup=False)
    return hid


def load_kernel(model: str | None, config: KernelConfig) -> Kernel:
    """Resolve `model`, check the memory budgets, and load an in-process kernel."""
    model_dir = fs.resolve_model(model)
    device = resolve_device(config.device)
    parse_memory_budget(config.kv_memory, device)  # fail on a bad budget before loading the weights
    if config.swap_memory not in ("0", 0):
        parse_memory_budget(config.swap_memory, "cpu")
    with err.status(f"loading {model_dir.name}", spinner="dots"):
        return Kernel(model_dir, config)


# ---- rendering -------------------------------------------------------------------------------------


def ps_table(rows: list[dict]) -> Table:
    table = Table("PID", "OWNER", "STATE", "NI", "PPID", "PROMPT", "OUT", "RES", "SWAP", "KV MiB", "TOK/S", "AGE",
                  box=None, header_style="bold")
    for c in (0, 3, 4, 5, 6, 7, 8, 9, 10, 11):
        table.columns[c].justify = "right"
    for r in rows:
        reason = r["finish_reason"]
        state = r["state"].lower() + (f" ({reason})" if reason in ("stop", "length", "abort") else "")
        table.add_row(str(r["pid"]), r["owner"], state, str(r["nice"]), str(r["parent"] or "-"),
                      str(r["prompt_tokens"]), str(r["output_tokens"]), str(r["resident_blocks"]),
                      str(r["swapped_blocks"]), f"{r['kv_bytes'] / MiB:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['age_s']:.1f}s")
    return table


def jobs_table(rows: list[dict]) -> Table:
    """The training jobs of a daemon (`GET /v1/jobs` rows): state ("yielding" while paused for interactive
    inference), step/total, train and validation loss, tokens/s and ETA from the run's progress.json."""
    table = Table("JOB", "OWNER", "STATE", "STEP", "LOSS", "VAL", "TOK/S", "ETA", "OUT", box=None, header_style="bold")
    for c in (3, 4, 5, 6, 7):
        table.columns[c].justify = "right"
    table.columns[8].overflow = "fold"

    def num(value, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    for r in rows:
        p = r.get("progress") or {}
        state = "yielding" if r.get("yielding") else r["state"]
        if r["state"] == "failed" and r.get("exit_code") is not None:
            state += f" ({r['exit_code']})"
        step = f"{p['step']}/{p.get('total_steps', '?')}" if isinstance(p.get("step"), int) else "-"
        eta = p.get("eta_s") if r["state"] == "running" else None
        table.add_row(r["id"], r["owner"], state, step, num(p.get("train_loss"), ".3f"), num(p.get("val_loss"), ".3f"),
                      num(p.get("tokens_per_s"), ",.0f"), duration(eta) if isinstance(eta, (int, float)) else "-",
                      r["out_dir"])
    return table


def duration(seconds: float) -> str:
    """"42s", "3m05s", "2h07m" for a number of seconds."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def bar(used: int, cached: int, total: int, width: int = 30) -> Text:
    """[███▒▒·····]: blocks in use, cached prefix blocks (free to reuse), free blocks."""
    if total == 0:
        return Text("[" + " " * width + "]", style="dim")
    u = min(width, -(-width * used // total))  # ceil: a used block always shows
    c = min(width - u, round(width * cached / total))
    return Text.assemble("[", ("█" * u, "green"), ("▒" * c, "cyan"), ("·" * (width - u - c), "dim"), "]")


def memory_lines(m: dict) -> list[tuple[str, Text | str]]:
    """(label, value) rows for `mem` and `top`, from `Kernel.memory()`."""
    per_block = m["bytes_per_block"]
    swap_used = m["swap_blocks"] - m["free_swap_blocks"]
    pc = m["prefix_cache"]
    rows: list[tuple[str, Text | str]] = [
        ("KV pool", Text.assemble(bar(m["used_blocks"], m["cached_blocks"], m["num_blocks"]),
                                  f" {m['used_blocks']}/{m['num_blocks']} blocks used, {m['cached_blocks']} cached, "
                                  f"{m['used_blocks'] * per_block / MiB:.2f}/{m['pool_bytes'] / MiB:.2f} MiB")),
        ("swap", Text.assemble(bar(swap_used, 0, m["swap_blocks"]),
                               f" {swap_used}/{m['swap_blocks']} blocks used, "
                               f"{swap_used * per_block / MiB:.2f}/{m['swap_bytes'] / MiB:.2f} MiB")),
        ("prefix cache", f"{pc['prefix_hits']}/{pc['prefix_queries']} prompt tokens hit ({pc['hit_rate']:.0%}), "
                         f"{pc['evictions']} blocks evicted"),
        ("block", f"{m['block_size']} tokens, {decimal(per_block)}"),
        ("policy", m["policy"]),
    ]
    counters = m.get("counters", {})
    for owner, o in sorted(m["owners"].items()):
        vtc = f", VTC counter {counters[owner]:g}" if owner in counters else ""
        n = o["processes"]
        rows.append((f"owner {owner}", f"{n} live process{'es' if n != 1 else ''}, {o['resident_blocks']} resident + "
                                       f"{o['swapped_blocks']} swapped blocks{vtc}"))
    return rows


def memory_table(m: dict) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in memory_lines(m):
        table.add_row(label, value)
    return table


def top_frame(session: Session) -> Group:
    """One `top` screen: the kernel line, the memory bars, and the process table."""
    t = syscalls.top(session.kernel, session.caller)
    suspended = sum(r["state"] == "SUSPENDED" for r in t["processes"])
    head = Text.assemble(("llmos top", "bold"), f" - {session.kernel.model_name}, policy {t['memory']['policy']}, "
                         f"step {t['steps']}, {t['running']} running, {t['waiting']} waiting, {suspended} suspended, "
                         f"{time.strftime('%H:%M:%S')}")
    return Group(head, memory_table(t["memory"]), Text(""), ps_table(t["processes"]))


def hibernated_table(images: list[dict]) -> Table:
    table = Table("HID", "MODEL", "PROMPT", "OUT", "SIZE", "CREATED", "STATUS", box=None, header_style="bold")
    for c in (2, 3, 4):
        table.columns[c].justify = "right"
    table.columns[6].overflow = "fold"
    for e in images:
        try:
            created = datetime.fromtimestamp(e["created"]).strftime("%Y-%m-%d %H:%M:%S") if e["created"] else "-"
        except (OverflowError, OSError, ValueError, TypeError):  # a hand-edited time
            created = "?"
        status = "ok" if e["status"] == "ok" else f"[red]corrupt[/]: {e['error']}"
        table.add_row(e["hid"], e["model"] or "-", str(e["prompt_tokens"] if e["prompt_tokens"] is not None else "-"),
                      str(e["output_tokens"] if e["output_tokens"] is not None else "-"), decimal(e["size_bytes"]),
                      created, status)
    return table


# ---- the shell's commands --------------------------------------------------------------------------

commands = typer.Typer(name="", add_completion=False, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["--help", "-h"]})
Pid = Annotated[int, typer.Argument(help="A process id (`ps` lists them).", show_default=False)]


def remember(sh: Session, value: int | str) -> None:
    """Print a new pid or image id, and keep it as `$!`."""
    sh.last = str(value)
    out.print(str(value), markup=False)


@commands.command()
def spawn(
    ctx: typer.Context,
    prompt: Annotated[list[str], typer.Argument(
        help="The text to continue (words are joined by spaces).", show_default=False)],
    owner: Annotated[Optional[str], typer.Option(
        "--owner", help="Run it as this owner (default: the shell's).", show_default=False)] = None,
    nice: Annotated[int, typer.Option("--nice", help="-20 (most favoured) .. 19 (least).")] = 0,
    n: Annotated[int, typer.Option("-n", "--n", help="Parallel samples: n - 1 children forked after the prompt.")] = 1,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.8,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
) -> None:
    """Start a process; prints its pid."""
    sh: Session = ctx.obj
    if owner is not None and not owner.strip():
        raise InvalidRequestError("--owner must be a non-empty name.")
    params = sampling_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
    remember(sh, syscalls.spawn(sh.kernel, " ".join(prompt), params, owner=owner or sh.owner, nice=nice, n=n))


@commands.command()
def ps(ctx: typer.Context,
       every: Annotated[bool, typer.Option("-a", "--all", help="Also the ended processes.")] = False) -> None:
    """List processes: state, nice, parent, tokens, KV blocks, tokens/s, age."""
    sh: Session = ctx.obj
    out.print(ps_table(syscalls.ps(sh.kernel, sh.caller, all=every)))


@commands.command()
def top(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option("--interval", min=0.0, max=3600.0,
                                            help="Seconds between refreshes (0 to 3600).")] = 0.5,
    iterations: Annotated[Optional[int], typer.Option(
        "--iterations", min=1, help="Stop after N refreshes (default: Ctrl-C on a terminal; idle when piped).",
        show_default=False)] = None,
) -> None:
    """Watch the kernel run: memory, prefix cache, processes. Steps the kernel meanwhile; Ctrl-C returns."""
    sh: Session = ctx.obj

    def advance():
        deadline = time.monotonic() + interval
        step(sh.kernel, 1)  # at least one step per frame, then as many as fit in the interval
        while time.monotonic() < deadline and sh.kernel.has_work():
            step(sh.kernel, 1)
        time.sleep(max(0.0, deadline - time.monotonic()))
        return top_frame(sh), sh.kernel.has_work()

    watch(top_frame(sh), sh.kernel.has_work(), advance, iterations)


def watch(frame, busy: bool, advance, iterations: int | None) -> None:
    """`top`'s screen: `frame` first, then each of `advance()`'s `(frame, busy)` until `iterations` frames were
    shown. On a terminal it redraws in place until Ctrl-C; piped (like `top -b`) it prints frame after frame and,
    without `iterations`, stops once nothing is `busy`."""
    live = Live(frame, console=out, auto_refresh=False) if out.is_terminal else None
    try:
        if live:
            live.start()
        else:
            out.print(frame)
        shown = 1
        while iterations is None or shown < iterations:
            if live is None and iterations is None and not busy:
                break
            (frame, busy), shown = advance(), shown + 1
            if live:
                live.update(frame, refresh=True)
            else:
                out.print(frame)
    except KeyboardInterrupt:  # the way to leave a live view (back to the prompt in `llmos sh`)
        pass
    finally:
        if live:
            live.stop()


@commands.command()
def kill(ctx: typer.Context, pid: Pid) -> None:
    """End a process; its KV blocks are free at once (a hibernated one's image is deleted)."""
    sh: Session = ctx.obj
    syscalls.kill(sh.kernel, pid, sh.caller)


@commands.command()
def suspend(ctx: typer.Context, pid: Pid) -> None:
    """Stop scheduling a process (its K/V go to host swap, or are recomputed on resume)."""
    sh: Session = ctx.obj
    syscalls.suspend(sh.kernel, pid, sh.caller)


@commands.command()
def resume(ctx: typer.Context, target: Annotated[str, typer.Argument(
        metavar="PID|HID", help="A suspended pid, or a hibernated image id (hXXXXXXXXXX).",
        show_default=False)]) -> None:
    """Resume a suspended process, or restore a hibernated one (prints its new pid)."""
    sh: Session = ctx.obj
    if target.isascii() and target.isdigit():
        syscalls.resume(sh.kernel, int(target), sh.caller)
    elif HID_PATTERN.fullmatch(target):
        remember(sh, syscalls.restore(sh.kernel, target, sh.owner))
    else:
        raise InvalidRequestError(f"{target!r} is neither a pid nor a hibernation id (h + 10 hex characters); "
                                  "`ps` and `hibernated` list them.")


@commands.command()
def hibernate(ctx: typer.Context, pid: Pid) -> None:
    """Write a process to disk and end it here; prints the image id (`resume HID` brings it back)."""
    sh: Session = ctx.obj
    remember(sh, syscalls.hibernate(sh.kernel, pid, sh.caller))


@commands.command(context_settings={"ignore_unknown_options": True})  # `nice 3 -5`: -5 is a level, not an option
def nice(ctx: typer.Context, pid: Pid, level: Annotated[int, typer.Argument(
        help="-20 (most favoured) .. 19 (least).", show_default=False)]) -> None:
    """Set a live process's nice level (under the priority policy, lower runs first)."""
    sh: Session = ctx.obj
    syscalls.nice(sh.kernel, pid, level, sh.caller)


@commands.command()
def fork(ctx: typer.Context, pid: Pid, n: Annotated[int, typer.Argument(help="How many children.")] = 1) -> None:
    """Make n children that continue from where the process is (sharing its KV blocks); prints their pids."""
    sh: Session = ctx.obj
    children = syscalls.fork(sh.kernel, pid, n, sh.caller)
    out.print(" ".join(map(str, children)), markup=False)
    sh.last = str(children[-1])


@commands.command("step")
def step_command(ctx: typer.Context, n: Annotated[int, typer.Argument(min=1, help="Kernel steps.")] = 1) -> None:
    """Run N kernel steps (one batch each)."""
    sh: Session = ctx.obj
    steps, tokens = step(sh.kernel, n)
    out.print(f"{steps} steps, {tokens} tokens" + ("" if sh.kernel.has_work() else ", idle"))


@commands.command("run")
def run_command(ctx: typer.Context) -> None:
    """Step the kernel until it is idle (suspended processes stay suspended)."""
    sh: Session = ctx.obj
    steps, tokens = step(sh.kernel, None)
    out.print(f"{steps} steps, {tokens} tokens, idle")


@commands.command()
def wait(ctx: typer.Context, pid: Pid) -> None:
    """Step the kernel until the process ends; prints how it ended."""
    sh: Session = ctx.obj
    if process_row(sh.kernel, pid, sh.caller)["state"] == "SUSPENDED":
        raise InvalidRequestError(f"process {pid} is suspended and would never end; `resume {pid}` first.")
    step(sh.kernel, None, until=lambda: process_row(sh.kernel, pid, sh.caller)["state"] in ENDED)
    row = process_row(sh.kernel, pid, sh.caller)
    if row["state"] not in ENDED:
        raise InvalidRequestError(f"process {pid} cannot run (the kernel is idle); `ps` shows its state.")
    out.print(f"{pid} {row['state'].lower()} ({row['finish_reason']}), {row['output_tokens']} output tokens")


@commands.command()
def cat(ctx: typer.Context, pid: Pid) -> None:
    """Print a process's text so far."""
    sh: Session = ctx.obj
    write(process_row(sh.kernel, pid, sh.caller)["text"] + "\n")


@commands.command()
def mem(ctx: typer.Context) -> None:
    """KV pool and swap use, prefix-cache hits, policy, per-owner blocks."""
    sh: Session = ctx.obj
    out.print(memory_table(syscalls.top(sh.kernel, sh.caller)["memory"]))


@commands.command()
def hibernated(ctx: typer.Context) -> None:
    """List the shell owner's hibernated processes on disk."""
    sh: Session = ctx.obj
    images = syscalls.hibernated(sh.kernel, sh.owner)
    out.print(hibernated_table(images) if images else "(no hibernated processes)")


@commands.command("help")
def help_command(ctx: typer.Context, command: Annotated[Optional[str], typer.Argument(
        help="Show this command's options.", show_default=False)] = None) -> None:
    """List the commands, or show one command's options."""
    group = ctx.find_root().command
    if command is not None:
        if group.get_command(ctx, command) is None:
            raise InvalidRequestError(f"no command {command!r}; `help` lists the commands.")
        group.main([command, "--help"], prog_name="", standalone_mode=False, obj=ctx.obj)
        return
    table = Table.grid(padding=(0, 2))
    for name, cmd in group.commands.items():
        if not cmd.hidden:
            table.add_row(Text(name, style="bold"), cmd.get_short_help_str(limit=100))
    out.print(table)
    out.print("`CMD --help` shows a command's options; `;` separates commands; `$!` is the last pid or image id "
              "printed.", markup=False, soft_wrap=True)


@commands.command("exit")
def exit_command() -> None:
    """Leave the shell (also `quit`, Ctrl-D); its live processes end with it, so hibernate the ones to keep."""
    raise ExitShell


@commands.command("quit", hidden=True)
def quit_command() -> None:
    """Leave the shell."""
    raise ExitShell


# ---- the command loop ------------------------------------------------------------------------------


def split_commands(line: str) -> list[list[str]]:
    """A line's commands: shell words (shlex), `;` between commands, `#` starts a comment.

    Raises `InvalidRequestError` for an unclosed quote."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as e:
        raise InvalidRequestError(f"cannot split the line into words: {e} (quote with ' or \").") from None
    result: list[list[str]] = [[]]
    for word in words:
        if word and set(word) == {";"}:
            result += [[] for _ in word]  # distinct lists: `a;; b` is a, (nothing), b
        else:
            result[-1].append(word)
    return [c for c in result if c]


def execute(group: typer.core.TyperGroup, sh: Session, args: list[str]) -> None:
    """Run one command. Raises `LlmosError` for anything the user did wrong, `KeyboardInterrupt` for Ctrl-C."""
    if "$!" in args:
        if sh.last is None:
            raise InvalidRequestError("$! is not set: no spawn, fork, hibernate or resume has printed an id yet.")
        args = [sh.last if a == "$!" else a for a in args]
    try:
        code = group.main(args, prog_name="", standalone_mode=False, obj=sh)
    except typer.TyperException as e:  # a usage error: unknown command or option, missing or bad argument
        ctx = getattr(e, "ctx", None)
        command = ctx.info_name if ctx is not None and ctx.command is not group else None
        hint = f"`{command} --help` shows its usage" if command else "`help` lists the commands"
        raise InvalidRequestError(f"{e.format_message().rstrip('.')}; {hint}.") from None
    except typer.Abort:
        raise KeyboardInterrupt from None
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C inside a command into Exit(130)
        raise KeyboardInterrupt


def read_commands(source: Iterator[str] | None) -> Iterator[tuple[int, str]]:
    """(line number, line): from `source`, or typed at the `llmos> ` prompt (source None) until Ctrl-D."""
    if source is not None:
        yield from enumerate(source, 1)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    number = 0
    while True:
        number += 1
        try:
            yield number, out.input("[bold green]llmos>[/] ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in bash
            out.print()


def stdin_lines() -> Iterator[str]:
    while True:
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline().encode()
        if not raw:
            return
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise InvalidRequestError("a line on stdin is not UTF-8 text; save the script as UTF-8.") from None


def script_lines(command: str | None, script: Path | None) -> Iterator[str] | None:
    """The non-interactive source of commands, or None for the interactive prompt."""
    if command is not None and script is not None:
        raise InvalidRequestError("give the commands either with -c or as a SCRIPT file, not both.")
    if command is not None:
        return iter(command.splitlines() or [""])
    if script is not None and str(script) != "-":
        try:
            return iter(script.read_bytes().decode("utf-8-sig").splitlines())  # a leading BOM is not a command
        except FileNotFoundError:
            raise InvalidRequestError(f"script {script} does not exist; check the path.") from None
        except IsADirectoryError:
            raise InvalidRequestError(f"script {script} is a directory; give a file of shell commands.") from None
        except UnicodeDecodeError:
            raise InvalidRequestError(f"script {script} is not UTF-8 text; save it as UTF-8.") from None
        except OSError as e:
            raise InvalidRequestError(f"cannot read script {script}: {e.strerror}.") from None
    if script is not None or not sys.stdin.isatty():
        return stdin_lines()
    return None


def command_loop(sh: Session, source: Iterator[str] | None) -> int:
    """Run commands until the end of `source` (or `exit`); returns the exit status.

    Interactive (source None): an error is printed and the next prompt comes. From a script: the first
    error stops the shell with status 2 (130 after Ctrl-C)."""
    group = typer.main.get_command(commands)
    interactive = source is None
    for number, line in read_commands(source):
        try:
            for args in split_commands(line):
                execute(group, sh, args)
        except ExitShell:
            return 0
        except LlmosError as e:
            print_error(str(e) if interactive else f"line {number}: {e}")
            if not interactive:
                return EXIT_USER_ERROR
        except OSError as e:  # the system refused a read or write (permissions, a full disk): not a shell crash
            print_error(f"{e.strerror or e}: {e.filename or ''}" if interactive
                        else f"line {number}: {e.strerror or e}: {e.filename or ''}")
            if not interactive:
                return 1
        except KeyboardInterrupt:
            if not interactive:
                return EXIT_INTERRUPTED
            out.print()
            notice("interrupted; the processes go on (`ps` lists them)")
    return 0


def sh_command(
    script: Annotated[Optional[Path], typer.Argument(
        help="A file of shell commands, one or more per line (`-`: stdin).", show_default=False)] = None,
    command: Annotated[Optional[str], typer.Option(
        "-c", "--command", help="Run these commands (`;` between them) instead of a prompt.",
        show_default=False)] = None,
    model: ModelOpt = None,
    policy: Annotated[str, typer.Option("--policy", help="Scheduling policy: fcfs, priority or fair.")] = "fcfs",
    kv_memory: KVMemory = "0.25",
    swap_memory: Annotated[str, typer.Option(
        "--swap-memory", help="Host swap for preempted and suspended processes: a size (256MiB), or 0 for none.",
        rich_help_panel="Kernel")] = "256MiB",
    rr_quantum: Annotated[Optional[int], typer.Option(
        "--rr-quantum", min=1, help="Round robin: preempt a process after this many tokens while others wait.",
        show_default=False, rich_help_panel="Kernel")] = None,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache", help="Share the KV blocks of identical prompt prefixes (per owner).",
        rich_help_panel="Kernel")] = True,
    device: Device = None,
    owner: Annotated[str, typer.Option("--owner", help="Whose processes the shell acts on.")] = "local",
    admin: Annotated[bool, typer.Option("--admin", help="Act on every owner's processes.")] = False,
) -> None:
    """A kernel shell: spawn, ps, top, kill, suspend, resume, hibernate, nice, fork ... on one in-process kernel."""
    if not owner.strip():
        raise InvalidRequestError("--owner must be a non-empty name.")
    source = script_lines(command, script)
    config = KernelConfig(kv_memory=kv_memory, swap_memory=swap_memory, policy=policy, rr_quantum=rr_quantum,
                          enable_prefix_cache=prefix_cache, device=device)
    kernel = load_kernel(model, config)
    sh = Session(kernel, owner, admin)
    if source is None:
        notice(f"llmos shell on {kernel.model_name} ({policy} policy, {kernel.block_manager.num_blocks} KV blocks), "
               f"owner {owner}{' (admin)' if admin else ''}; `help` lists commands, `exit` or Ctrl-D quits")
    status = command_loop(sh, source)
    if status:
        raise typer.Exit(status)


# ---- the in-process half of the top-level `llmos resume HID` (cli/remote_cmd.py picks it without a daemon) ----


def image_model(hid: str, owner: str) -> Path:
    """The checkpoint directory of the model that image `hid` ran on: the bundled one or a registered one
    of the same directory name. Raises `HibernationError` / `ModelLoadError`."""
    store = default_store()
    store.path(hid, owner)  # a malformed id is refused here
    entry = next((e for e in store.list(owner) if e["hid"] == hid), None)
    if entry is None:
        raise HibernationError(f"no hibernated process {hid}; `llmos ps` lists them.")
    if entry["status"] != "ok":
        raise HibernationError(entry["error"])
    name = entry["model"]
    candidates = [fs.default_model_dir()] if fs.default_model_dir().name == name else []
    candidates += [m.path for m in fs.list_models() if name in (m.name, m.path.name)]
    for path in candidates:
        if path.is_dir():
            return path
    raise ModelLoadError(f"hibernated process {hid} ran on model {name!r}, which is neither the bundled model nor a "
                         "registered one; pass --model with its checkpoint directory.")


def resume_local(hid: str, model: str | None, owner: str, max_steps: int | None, hibernate_after: int | None,
                 kv_memory: str, device: str | None, stats: bool, say: Callable[[], None] = lambda: None) -> None:
    """`llmos resume HID` in-process: restore image `hid` of `owner` on an in-process kernel and stream the rest of
    its text to stdout (the options are `llmos resume`'s). `say()` prints where it runs, once it is restored."""
    model_dir = fs.resolve_model(model) if model is not None else image_model(hid, owner)
    kernel = load_kernel(str(model_dir), KernelConfig(kv_memory=kv_memory, device=device, max_num_seqs=1))
    pid = syscalls.restore(kernel, hid, owner)
    say()
    before = process_row(kernel, pid, owner)["output_tokens"]
    t0 = time.perf_counter()
    if not stream_until(kernel, pid, owner, hibernate_after, max_steps):
        hibernate_and_tell(kernel, pid, owner)
        return
    write("\n")
    row = process_row(kernel, pid, owner)
    more, elapsed = row["output_tokens"] - before, time.perf_counter() - t0
    if stats:
        rate = f"{more / elapsed:.1f} tokens/s" if more and elapsed > 0 else "- tokens/s"
        err.print(f"resumed {hid} as pid {pid}: {more} more output tokens ({row['output_tokens']} in all), {rate}, "
                  f"finish: {row['finish_reason']}", style="dim", soft_wrap=True, markup=False)


def run_and_hibernate(kernel: Kernel, pid: int, after: int) -> bool:
    """`llmos run --hibernate-after N`: stream until N output tokens, then hibernate. False if it was hibernated
    (its image id is on stderr), True if it ended first."""
    if stream_until(kernel, pid, "local", more_tokens=after):
        return True
    hibernate_and_tell(kernel, pid, "local")
    return False
