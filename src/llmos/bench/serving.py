"""The serving benchmark: one workload of concurrent requests through llmos and transformers, side by side in one run.

Owns the workload, the run configuration and the orchestration: one fresh subprocess per system (so peak memory is
per system and no system warms or disturbs another), a progress bar, the results files. Never times anything itself
(systems.py does) and never formats numbers (report.py does).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llmos.bench import report
from llmos.bench.checkpoints import RANDOM_MODELS, resolve_model
from llmos.bench.systems import SERVING_SYSTEMS
from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.model.config import ModelConfig

DEFAULT_SYSTEMS = ("llmos", "hf-sequential", "hf-static", "hf-continuous")
DEFAULT_MODELS = ("default", "llama-110m")
FIRST_TOKEN_ID = 100  # prompts are random ids in [100, vocab): clear of the special tokens at the bottom


@dataclass(frozen=True)
class Workload:
    """`num_requests` requests, all arriving at t=0; prompt and output lengths (tokens) uniform in the inclusive
    ranges, drawn with `random.Random(seed)`; greedy, EOS ignored, so request i generates exactly its length.
    Batch-1 decode: a `decode_context`-token prompt, then `decode_steps` decode steps."""

    num_requests: int = 32
    prompt_lens: tuple[int, int] = (32, 512)
    output_lens: tuple[int, int] = (16, 256)
    seed: int = 0
    decode_context: int = 64
    decode_steps: int = 64
    scaled_from: tuple[int, int] | None = None  # the longest prompt + output before `fit` shrank the ranges

    def fit(self, context_length: int) -> Workload:
        """The same workload, lengths scaled down by one factor when the longest request (prompt + output) would
        not fit in `context_length` tokens (a small model); unchanged otherwise."""
        fitted = self
        longest = self.prompt_lens[1] + self.output_lens[1]
        if longest >= context_length:
            s = (context_length - 1) / longest

            def scale(r: tuple[int, int]) -> tuple[int, int]:
                return max(1, int(r[0] * s)), max(1, int(r[1] * s))

            fitted = replace(self, prompt_lens=scale(self.prompt_lens), output_lens=scale(self.output_lens),
                             scaled_from=(self.prompt_lens[1], self.output_lens[1]))
        if self.decode_context + self.decode_steps + 1 >= context_length:
            half = (context_length - 2) // 2
            fitted = replace(fitted, decode_context=max(1, half), decode_steps=max(1, half))
        return fitted

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        """`[(prompt token ids, output length)]`, the same for every system."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.num_requests):
            prompt_len, output_len = rng.randint(*self.prompt_lens), rng.randint(*self.output_lens)
            out.append(([rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(prompt_len)], output_len))
        return out

    def decode_prompt(self, vocab_size: int) -> list[int]:
        rng = random.Random(self.seed + 1)
        return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(self.decode_context)]


QUICK = Workload(num_requests=4, prompt_lens=(8, 32), output_lens=(4, 16), decode_context=8, decode_steps=8)


@dataclass
class BenchConfig:
    """One benchmark run. `models`: names for `checkpoints.resolve_model` (None: the bundled default model and
    llama-110m, or the tiny model with `quick`). `threads`: torch threads per system (0 = every core).
    `requests`: None = the workload's 32 (4 with `quick`). `kv_memory` / `max_num_batched_tokens`: llmos kernel
    settings (None = the kernel's defaults)."""

    models: list[str] | None = None
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    requests: int | None = None
    seed: int = 0
    threads: int = 0
    out: Path = Path("benchmarks/results")
    quick: bool = False
    decode: bool = True
    kv_memory: str | None = None
    max_num_batched_tokens: int | None = None
    explicit_models: bool = field(init=False, default=False)

    def validate(self) -> BenchConfig:
        """Raises `InvalidRequestError` for unknown systems, requests < 1, threads < 0, a bad kernel setting,
        and `ModelLoadError` for a model that is neither a known name nor a directory."""
        unknown = [s for s in self.systems if s not in SERVING_SYSTEMS]
        if unknown or not self.systems:
            raise InvalidRequestError(f"unknown system(s) {', '.join(unknown) or '(none given)'}; choose from "
                                      f"{', '.join(SERVING_SYSTEMS)} (comma-separated).")
        if self.requests is not None and self.requests < 1:
            raise InvalidRequestError(f"--requests must be at least 1 (got {self.requests}).")
        if self.threads < 0:
            raise InvalidRequestError(f"--threads must be 0 (every core) or more (got {self.threads}).")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise InvalidRequestError(f"--max-batched-tokens must be at least 1 (got {self.max_num_batched_tokens}).")
        if self.kv_memory is not None:
            from llmos.kernel.kvcache import parse_memory_budget

            parse_memory_budget(self.kv_memory)
        self.explicit_models = self.models is not None
        if not self.models:
            self.models = ["tiny"] if self.quick else list(DEFAULT_MODELS)
        peers = [s for s in self.systems if s.startswith("hf-")]
        built = [m for m in self.models if m in RANDOM_MODELS]
        if (peers or built) and importlib.util.find_spec("transformers") is None:
            needs = ", ".join(peers + [f"building {m}" for m in built])
            raise InvalidRequestError(f"{needs} need(s) transformers, which is not installed: install the bench extra "
                                      "(pip install -e '.[bench]'), or benchmark llmos alone on a model directory "
                                      "(--systems llmos --model DIR).")
        for name in self.models:
            if name not in ("default", *RANDOM_MODELS) and not Path(name).expanduser().is_dir():
                raise ModelLoadError(f"model {name!r} is neither a directory nor one of default, "
                                     f"{', '.join(RANDOM_MODELS)}; pass a Hugging Face checkpoint directory.")
        return self

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def workload(self) -> Workload:
        base = QUICK if self.quick else Workload()
        return replace(base, num_requests=self.requests or base.num_requests, seed=self.seed)

    def kernel_settings(self) -> dict:
        settings = {"kv_memory": self.kv_memory, "max_num_batched_tokens": self.max_num_batched_tokens}
        return {k: v for k, v in settings.items() if v is not None}

    def command(self) -> str:
        """The `llmos bench` command line that repeats this run."""
        parts = ["llmos bench"] + (["--quick"] if self.quick else [])
        parts += [f"--model {m}" for m in self.models or []]
        parts += [f"--systems {','.join(self.systems)}", f"--requests {self.workload().num_requests}",
                  f"--seed {self.seed}", f"--threads {self.num_threads}", f"--out {self.out}"]
        parts += [] if self.decode else ["--no-decode"]
        parts += [f"--kv-memory {self.kv_memory}"] if self.kv_memory is not None else []
        parts += [f"--max-batched-tokens {self.max_num_batched_tokens}"] if self.max_num_batched_tokens else []
        return " ".join(parts)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def run_benchmark(config: BenchConfig, console: Console | None = None) -> dict:
    """Run every selected system on every model, print the tables, and write `results.json`,
    `benchmarks-section.md` and (with matplotlib) one PNG per model into `config.out`. Returns the results.

    Raises `InvalidRequestError` / `ModelLoadError` for bad options (see `BenchConfig.validate`). A system that
    crashes is reported as failed (its log is in `out/logs/`) and the others still run.
    """
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 132))
    config.validate()
    notes, models = [], []
    for name in config.models:  # resolve (and build) every model before the first measurement
        try:
            with console.status(f"preparing model {name}"):
                models.append((name, resolve_model(name)))
        except ModelLoadError as err:
            if config.explicit_models or name != "default":
                raise
            notes.append(f"skipped the bundled default model: {err}")
            console.print(f"[yellow]{notes[-1]}[/yellow]")
    out = Path(config.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results = {"command": config.command(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": {**machine(), "threads": config.num_threads}, "notes": notes,
               "models": [run_model(config, name, model_dir, out, console) for name, model_dir in models]}
    report.write_results(results, out, console)
    return results


def run_model(config: BenchConfig, name: str, model_dir: Path, out: Path, console: Console) -> dict:
    """All jobs on one checkpoint: the serving systems, then batch-1 decode and copy bandwidth."""
    mc = ModelConfig.from_dir(model_dir)
    workload = config.workload().fit(mc.context_length)
    requests = workload.requests(mc.vocab_size)
    base = {"model_dir": str(model_dir), "threads": config.num_threads, "kernel": config.kernel_settings(),
            "requests": requests}
    jobs = [(system, base) for system in config.systems]
    if config.decode:
        decode = {**base, "requests": [], "decode_prompt": workload.decode_prompt(mc.vocab_size),
                  "decode_steps": workload.decode_steps, "repeats": 3}
        if "llmos" in config.systems:
            jobs += [("llmos-decode", decode), ("bandwidth", {**base, "requests": [],
                                                             "bandwidth_mib": 64 if config.quick else 512})]
        if any(s.startswith("hf-") for s in config.systems):
            jobs.append(("hf-decode", decode))
    raw = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        overall = bar.add_task(f"{name}: {len(requests)} requests", total=len(jobs))
        for system, spec in jobs:
            task = bar.add_task(f"  {system}", total=None)
            raw[system] = run_job({**spec, "job": system}, out / "logs" / f"{label(name)}-{system}.log", bar, task)
            bar.update(task, description=f"  {system}" + (" [red]failed[/red]" if "error" in raw[system] else ""))
            bar.advance(overall)
            if "user_error" in raw[system]:  # bad input (a setting, the checkpoint): the same for every system
                raise InvalidRequestError(f"{system} on {name}: {raw[system]['user_error']}")
    summary = report.summarize_model(name, model_dir, mc, workload, requests, raw)
    summary["failed"] = [f"{name} {system}: {r['error']}" for system, r in raw.items() if "error" in r]
    return summary


def label(name: str) -> str:
    """A file-name-safe label for a model given by name or path (its last component)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name) or "model"


def run_job(spec: dict, log: Path, bar: Progress, task) -> dict:
    """Run one job in a fresh interpreter; its progress lines drive `task`. Returns its result, or
    `{"error": ...}` naming the log when it fails."""
    import llmos

    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    src = str(Path(llmos.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        with open(log, "w") as log_file:
            child = subprocess.Popen([sys.executable, "-m", "llmos.bench.systems", str(spec_file), str(result_file)],
                                     stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
            total = 1
            for line in child.stdout:
                try:
                    msg = json.loads(line)
                    total = msg["total"]
                    bar.update(task, completed=msg["done"], total=total)
                except (ValueError, KeyError, TypeError):
                    pass
            code = child.wait()
        if code == 0:
            bar.update(task, completed=total, total=total)
        result = json.loads(result_file.read_text()) if result_file.is_file() else None
        if result is not None and "user_error" in result:
            return {"error": f"bad input: {result['user_error']}", "user_error": result["user_error"]}
        if code != 0 or result is None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            return {"error": f"exit code {code}: {tail[0][:300]} (full log: {log})"}
        return result


def main(argv: list[str] | None = None) -> None:
    """`python benchmarks/serving.py ...` and `python -m llmos.bench.serving ...`: the `llmos bench` command."""
    from llmos.cli.bench_cmd import main as cli_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_main()


if __name__ == "__main__":
    main()

