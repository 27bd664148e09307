"""The shell: `llmos run | chat | models | train | bench`, built on typer and rich.

Owns argument parsing and terminal output. Never holds model, kernel or training logic: every generation
goes through `llmos.kernel.syscalls` on an in-process Kernel, or to a running daemon (cli/remote_cmd.py). torch
is imported only when a command runs, so `llmos --help` stays fast. A user error (`LlmosError`) prints one
`error: ...` line and exits 2.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

import llmos
from llmos import fs
from llmos.cli.user_cmd import user_app
from llmos.errors import InvalidRequestError, LlmosError

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel
    from llmos.kernel.syscalls import Result
    from llmos.model.sampling import SamplingParams

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

out = Console(highlight=False, width=None if sys.stdout is None or sys.stdout.isatty() else 400)  # piped: no wrapping
err = Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One `error: <message>` line on stderr, never wrapped."""
    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


# ---- the command group: error handling and lazily imported commands ----------------------------


class LazyCommand(click.Command):
    """A command whose module is imported only when it runs or shows its own help.

    `llmos --help` lists it from `help` alone; `train` and `bench` pull in torch, which takes seconds.
    """

    def __init__(self, name: str, module: str, function: str, help: str) -> None:
        super().__init__(name, help=help, short_help=help)
        self.module, self.function = module, function

    @functools.cached_property
    def real(self) -> click.Command:
        command = getattr(importlib.import_module(self.module), self.function)
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        # Its own --help shows the function's docstring; a `context_settings` attribute reaches its parser (`nice`).
        single.command(self.name, context_settings=getattr(command, "context_settings", None))(command)
        return typer.main.get_command(single)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        return self.real.make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        return self.real.invoke(ctx)


LAZY_COMMANDS = [
    ("train", "llmos.cli.train_cmd", "train_command",
     "Train, continue or fine-tune a model (llama, gpt2, lstm; --nproc for torchrun); write a Hugging Face checkpoint."),
    ("bench", "llmos.cli.bench_cmd", "bench_command",
     "Benchmark serving throughput and latency: the llmos kernel against transformers."),
    ("sh", "llmos.cli.shell", "sh_command",
     "A kernel shell: spawn, ps, top, kill, suspend, resume, hibernate, nice, fork processes on one kernel."),
    ("ps", "llmos.cli.remote_cmd", "ps_command",
     "List processes: the daemon's live ones, its training jobs and your hibernated ones."),
    ("top", "llmos.cli.remote_cmd", "top_command",
     "Watch the daemon's kernels: memory, prefix cache, processes, training jobs."),
    ("kill", "llmos.cli.remote_cmd", "kill_command", "End a process or a training job on the daemon."),
    ("suspend", "llmos.cli.remote_cmd", "suspend_command",
     "Stop scheduling a process on the daemon, or checkpoint and stop a training job."),
    ("resume", "llmos.cli.remote_cmd", "resume_command",
     "Queue a suspended process or training job on the daemon again, or continue a hibernated one, streaming the "
     "rest of its text."),
    ("hibernate", "llmos.cli.remote_cmd", "hibernate_command",
     "Write a process on the daemon to disk; prints its image id."),
    ("nice", "llmos.cli.remote_cmd", "nice_command", "Set the nice level of a process on the daemon."),
    ("fork", "llmos.cli.remote_cmd", "fork_command",
     "Fork a process on the daemon; prints the children's pids."),
    ("logs", "llmos.cli.jobs_cmd", "logs_command", "Print a training job's output; --follow keeps printing it."),
    ("serve", "llmos.cli.serve_cmd", "serve_command",
     "Run the daemon: OpenAI/Ollama-compatible APIs, the process API, /metrics and the web desktop."),
]


class Shell(TyperGroup):
    """The top-level group: adds the lazy commands and turns user errors and Ctrl-C into exit codes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, module, function, help in LAZY_COMMANDS:
            if importlib.util.find_spec(module) is not None:  # skip a command whose module is not written yet
                self.add_command(LazyCommand(name, module, function, help))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlmosError as e:
            print_error(str(e))
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # `llmos run ... | head`: the reader left; stop quietly
            _silence_stdout()
            raise typer.Exit(0) from None


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. under a test runner)
        pass


app = typer.Typer(
    cls=Shell, name="llmos", help="llmos: an operating system for large language models.",
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"llmos {llmos.__version__}")
        raise typer.Exit()


@app.callback()
def shell(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    """llmos: an operating system for large language models."""


# ---- options shared by run and chat ------------------------------------------------------------

SAMPLING = "Sampling"
KERNEL = "Kernel"
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A checkpoint directory or a registered name (`llmos models`); default: the bundled model.",
    show_default=False)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Output tokens at most.", rich_help_panel=SAMPLING)]
Temperature = Annotated[float, typer.Option(
    "--temperature", "-t", help="Randomness: 0 is greedy.", rich_help_panel=SAMPLING)]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling, in (0, 1]; 1 is off.", rich_help_panel=SAMPLING)]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 is off.", rich_help_panel=SAMPLING)]
MinP = Annotated[float, typer.Option(
    "--min-p", help="Drop tokens below min-p x the top probability; 0 is off.", rich_help_panel=SAMPLING)]
RepetitionPenalty = Annotated[float, typer.Option(
    "--repetition-penalty", help="Above 1 discourages repeated tokens; 1 is off.", rich_help_panel=SAMPLING)]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", help="Make the random draws reproducible.", min=0, max=2**64 - 1, show_default=False,
    rich_help_panel=SAMPLING)]
Stop = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="End the output at this text (repeatable).", show_default=False, rich_help_panel=SAMPLING)]
IgnoreEos = Annotated[bool, typer.Option(
    "--ignore-eos", help="Keep generating past the end-of-sequence token.", rich_help_panel=SAMPLING)]
KVMemory = Annotated[str, typer.Option(
    "--kv-memory", help="KV cache budget: a fraction of free memory (0.25), or a size (512MiB).",
    rich_help_panel=KERNEL)]
Device = Annotated[Optional[str], typer.Option(
    "--device", help="cpu, cuda or cuda:N; default: cuda when available.", show_default=False,
    rich_help_panel=KERNEL)]
Local = Annotated[bool, typer.Option(
    "--local", help="Run in-process even when a daemon answers (at LLMOS_HOST, default 127.0.0.1:8000).")]


def sampling_params(**fields: Any) -> SamplingParams:
    """Validated `SamplingParams` from the command-line values (raises `InvalidRequestError`)."""
    from llmos.model.sampling import SamplingParams

    fields["stop"] = tuple(fields.get("stop") or ())
    return SamplingParams(**fields).validate()


def start_kernel(model: str | None, kv_memory: str, device: str | None) -> Kernel:
    """Resolve `model`, check the device and KV budget, and load an in-process kernel for one process."""

    from llmos.kernel.kernel import Kernel, KernelConfig, resolve_device
    from llmos.kernel.kvcache import parse_memory_budget

    model_dir = fs.resolve_model(model)
    parse_memory_budget(kv_memory, resolve_device(device))  # fail on a bad budget before loading the weights
    with err.status(f"loading {model_dir.name}", spinner="dots"):
        return Kernel(model_dir, KernelConfig(kv_memory=kv_memory, device=device, max_num_seqs=1))


def write(text: str) -> None:
    """Write generated text to stdout at once (no buffering, no markup)."""
    sys.stdout.write(text)
    sys.stdout.flush()


# ---- llmos run ---------------------------------------------------------------------------------


@app.command()
def run(
    prompt: Annotated[Optional[str], typer.Argument(
        help="The text to continue; `-` reads it from stdin.", metavar="PROMPT", show_default=False)] = None,
    model: ModelOpt = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Read the prompt from this UTF-8 file.", show_default=False)] = None,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.8,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    kv_memory: KVMemory = "0.25",
    device: Device = None,
    stats: Annotated[bool, typer.Option(
        "--stats/--no-stats", help="Print on stderr where it runs (daemon or in-process) and, at the end, token "
        "counts, TTFT and tokens/s.")] = True,
    hibernate_after: Annotated[Optional[int], typer.Option(
        "--hibernate-after", min=1, help="After N output tokens, hibernate the process to disk and print its image "
        "id on stderr (continue it with `llmos resume HID`).", show_default=False)] = None,
    local: Local = False,
) -> None:
    """Continue a prompt with a model, streaming the text to stdout as it is generated.

    It runs on the llmos daemon when one answers (LLMOS_HOST, default 127.0.0.1:8000), else in-process."""
    from llmos.cli import remote_cmd

    text = read_prompt(prompt, prompt_file)
    params = sampling_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
    link = remote_cmd.connect(local, quiet=not stats)
    if link.client is not None:
        return remote_cmd.run(link, text, params, model, stats, hibernate_after)
    from llmos.kernel import syscalls

    kernel = start_kernel(model, kv_memory, device)
    pid = syscalls.spawn(kernel, text, params)
    link.say()
    if hibernate_after is not None:
        from llmos.cli.shell import run_and_hibernate
        if not run_and_hibernate(kernel, pid, hibernate_after):
            return
    for delta in syscalls.stream(kernel, pid):
        write(delta)
    write("\n")
    if stats:
        print_stats(syscalls.wait(kernel, pid))


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text from the argument, stdin (`-`) or a file. Raises `InvalidRequestError`."""
    if prompt is not None and prompt_file is not None:
        raise InvalidRequestError("give the prompt either as an argument or with --prompt-file, not both.")
    if prompt_file is not None:
        text = decode_utf8(read_file(prompt_file), f"prompt file {prompt_file}")
    elif prompt == "-":
        text = decode_utf8(read_stdin(), "the prompt on stdin")
    elif prompt is None:
        raise InvalidRequestError("no prompt given: pass it as an argument, `-` to read stdin, or --prompt-file FILE.")
    else:
        text = prompt
    if not text:
        raise InvalidRequestError("the prompt is empty; give some text to continue.")
    return text


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequestError(f"prompt file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"prompt file {path} is a directory; give a text file.") from None
    except OSError as e:
        raise InvalidRequestError(f"cannot read prompt file {path}: {e.strerror}.") from None


def read_stdin() -> bytes:
    stdin = sys.stdin
    return stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                  "save it as UTF-8.") from None


def print_stats(result: Result) -> None:
    """One dim line: prompt and output tokens, time to first token, decode tokens/s, finish reason."""
    n = len(result.token_ids)
    ttft = f"{result.ttft_s * 1000:.0f} ms" if result.ttft_s is not None else "-"
    decode_s = (result.total_s or 0.0) - (result.ttft_s or 0.0)
    rate = f"{(n - 1) / decode_s:.1f} tokens/s" if n > 1 and decode_s > 0 else "- tokens/s"
    err.print(f"{result.prompt_tokens} prompt tokens, {n} output tokens, TTFT {ttft}, {rate}, "
              f"finish: {result.finish_reason}", style="dim", soft_wrap=True, markup=False)


# ---- llmos chat --------------------------------------------------------------------------------

CHAT_HELP = "/reset  clear the conversation\n/exit   quit (also /quit, or Ctrl-D)\n/help   this list"
PLAIN_CHAT_STOP = "\nUser:"  # the tokenizer's fallback template writes one "Role: text" line per message


@dataclasses.dataclass
class ChatSession:
    """A conversation with one model: the history, and the prompt that fits its context window."""

    kernel: Kernel
    params: SamplingParams
    system: str | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def prompt_ids(self) -> list[int]:
        """The rendered conversation as token ids, dropping the oldest turns until it leaves room to reply."""
        tokenizer = self.kernel.tokenizer
        context = self.kernel.context_length
        budget = context - min(self.params.max_tokens, context // 2)
        dropped = 0
        while True:
            text = tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=not tokenizer.has_chat_template)  # templates write BOS
            if len(ids) <= budget or len(self.history) <= 1:
                break
            del self.history[:2]  # the oldest user message and its reply
            dropped += 1
        if dropped:
            notice(f"dropped the {dropped} oldest turn(s) to fit the {context}-token context window")
        return ids

    def send(self, user_text: str) -> int:
        """Add the user's message and spawn the reply; returns its pid. A refused message leaves the history."""
        from llmos.kernel import syscalls

        self.history.append({"role": "user", "content": user_text})
        try:
            return syscalls.spawn(self.kernel, self.prompt_ids(), self.params)
        except LlmosError:
            self.history.pop()
            raise

    def receive(self, pid: int) -> Iterator[str]:
        """Stream the reply's text; it joins the history when done."""
        from llmos.kernel import syscalls

        answer = []
        try:
            for delta in syscalls.stream(self.kernel, pid):
                answer.append(delta)
                yield delta
        finally:  # also when the reply is interrupted: what was said so far stays in the conversation
            self.history.append({"role": "assistant", "content": "".join(answer).strip()})


@app.command()
def chat(
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option(
        "--system", "-s", help="A system message that starts the conversation.", show_default=False)] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.8,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    kv_memory: KVMemory = "0.25",
    device: Device = None,
    local: Local = False,
) -> None:
    """Talk with a model: type a message, read the streamed reply. /help lists the commands.

    With an llmos daemon running (LLMOS_HOST, default 127.0.0.1:8000) the conversation is a session kept there."""
    from llmos.cli import remote_cmd

    params = sampling_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos)
    link = remote_cmd.connect(local)
    if link.client is not None:
        return remote_cmd.chat(link, model, system, params)
    kernel = start_kernel(model, kv_memory, device)
    link.say()
    if not kernel.tokenizer.has_chat_template:
        params = dataclasses.replace(params, stop=(*params.stop, PLAIN_CHAT_STOP))
    session = ChatSession(kernel, params, system)
    template = "its chat template" if kernel.tokenizer.has_chat_template else "a plain User/Assistant template"
    notice(f"chatting with {kernel.model_name} ({template}, {kernel.context_length}-token context); "
           "/help lists commands, /exit quits")
    for line in read_lines():
        if line.startswith("/"):
            if not chat_command(session, line):
                return
        elif line.strip():
            chat_turn(session, line)


def chat_turn(session: ChatSession, text: str) -> None:
    """One exchange; a refused message (e.g. longer than the context window) is reported, not fatal."""
    try:
        pid = session.send(text)
    except LlmosError as e:
        print_error(str(e))
        return
    if sys.stdin.isatty():
        out.print("[bold cyan]llm>[/] ", end="")
    try:
        for delta in session.receive(pid):
            write(delta)
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        session.kernel.kill(pid)
        write("\n")
        notice("reply interrupted; the conversation goes on (/exit quits)")
        return
    write("\n")


def chat_command(session: ChatSession, line: str) -> bool:
    """Handle a /command; False means quit."""
    command = line.split()[0].lower()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.history.clear()
        notice("conversation cleared")
    elif command == "/help":
        (out if sys.stdin.isatty() else err).print(CHAT_HELP, markup=False)  # piped: stdout holds replies only
    else:
        print_error(f"unknown command {command}; /help lists the commands.")
    return True


def read_lines() -> Iterator[str]:
    """User lines: a rich prompt on a terminal, plain lines from piped stdin; ends at EOF."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                yield out.input("[bold green]you>[/] ")
            except EOFError:
                out.print()
                return
        else:
            raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline().encode()
            if not raw:
                return
            yield decode_utf8(raw, "a line on stdin").rstrip("\r\n")


def notice(message: str) -> None:
    err.print(f"({message})", style="dim", soft_wrap=True, markup=False)


# ---- llmos models ------------------------------------------------------------------------------

models_app = typer.Typer(help="List, add and remove models.", pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(user_app, name="user")  # llmos user add | list | rm | key | keys | revoke | quota (cli/user_cmd.py)


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, local: Local = False) -> None:
    """List the bundled default model and the registered ones (`llmos models add DIR` registers one).

    With an llmos daemon running, also which are loaded there and the memory each holds."""
    if ctx.invoked_subcommand is None:
        from llmos.cli import remote_cmd

        out.print(remote_cmd.models_listing(local))


@models_app.command("add")
def models_add(
    directory: Annotated[Path, typer.Argument(help="A Hugging Face checkpoint directory.", show_default=False)],
    name: Annotated[Optional[str], typer.Option(
        "--name", "-n", help="The name to use with --model; default: the directory's name.", show_default=False)] = None,
) -> None:
    """Register a checkpoint directory under a short name."""
    entry = fs.add_model(directory, name)
    out.print(f"registered [bold]{entry.name}[/] -> {entry.path}")


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="A registered model name.", show_default=False)]) -> None:
    """Unregister a model (its files stay where they are)."""
    entry = fs.remove_model(name)
    out.print(f"removed [bold]{entry.name}[/] ({entry.path} is untouched)")


def model_rows() -> list[tuple[str, Path]]:
    """(name, directory) of the bundled model and of every registered one. Raises `RegistryError`."""
    return [(fs.DEFAULT_MODEL_NAME, fs.default_model_dir())] + [(e.name, e.path) for e in fs.list_models()]


def models_table(rows: list[tuple[str, Path | None]], loaded: list[tuple[str, str]] | None = None) -> Table:
    """The `llmos models` table of (name, directory or None when unknown) rows; `loaded`, one (loaded, memory)
    pair per row from a daemon, adds those two columns."""
    columns = ("name", "family", "parameters", "size", "path") + (("loaded", "memory") if loaded is not None else ())
    table = Table(*columns, box=None, header_style="bold")
    table.columns[4].overflow = "fold"
    for i, (name, path) in enumerate(rows):
        described = (*describe(path), str(path)) if path is not None else ("-", "-", "-", "-")
        table.add_row(name, *described, *(loaded[i] if loaded is not None else ()))
    return table


def describe(path: Path) -> tuple[str, str, str]:
    """(family, parameters, size on disk) of a checkpoint directory; a missing or broken one says so."""
    from llmos.model.config import ModelConfig

    if not path.is_dir():
        return "[red]missing[/]", "-", "-"
    try:
        config = ModelConfig.from_dir(path)
    except LlmosError:
        return "[red]invalid[/]", "-", decimal(dir_size(path))
    return config.model_type, human_count(config.num_parameters()), decimal(dir_size(path))


def dir_size(path: Path) -> int:
    """Bytes of the regular files under `path` (links followed)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_count(n: int) -> str:
    """4_718_592 -> '4.7M'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def main() -> None:
    """The `llmos` console script."""
    try:
        if sys.stdout is None:  # started with stdout closed (`llmos run ... >&-`)
            sys.stderr.write("error: standard output is closed; llmos writes its results there.\n")
            sys.exit(2)
        app()
    except KeyboardInterrupt:  # Ctrl-C outside a command (e.g. while parsing)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `llmos run ... | head`: the reader is gone, which is not an error
        sys.exit(0)
    except OSError as e:  # the operating system refused a read or write (a full disk, a closed terminal)
        sys.stderr.write(f"error: {e.strerror or e}: {e.filename or 'standard output'}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
