"""`llmos bench`: the serving benchmark, llmos against transformers side by side in one run (and the kernel and
training suites).

Owns the command-line surface of `llmos.bench.serving.run_benchmark`, `llmos.bench.kernel_bench` and
`llmos.bench.training_bench`. Never contains benchmark logic.
Registered by `llmos.cli.main` as `app.command("bench")(bench_command)`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.errors import InvalidRequestError, LlmosError


def bench_command(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", help="A checkpoint directory, 'default' (the bundled model) or 'llama-110m' (random weights, "
                        "built once into ~/.cache/llmos/bench); repeatable. Default: default and llama-110m "
                        "(tiny with --quick). --suite train: the shape, 'default' (the bundled model's, fresh "
                        "random weights) or 'tiny'.")] = None,
    systems: Annotated[Optional[str], typer.Option(
        "--systems", help="Comma-separated: llmos, hf-sequential, hf-static, hf-continuous, hf-continuous-exact "
                          "(default: all but the last). --suite train: llmos, llmos+compile, hf-trainer, torch-loop "
                          "(the default; --quick: all but llmos+compile), hf-trainer+compile, and "
                          "llmos-base[+fused-ce][+fused-adamw][+malloc][+compile] to measure one lever at a time."
    )] = None,
    requests: Annotated[Optional[int], typer.Option(
        "--requests", help="Concurrent requests (default 32; 4 with --quick).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the prompt and output lengths and token ids.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="torch threads per system (0 = every core).")] = 0,
    out: Annotated[Path, typer.Option(
        "--out", help="Directory for results.json, benchmarks-section.md, charts and logs.")] = Path("benchmarks/results"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A few short requests on a tiny model: a smoke run, not a measurement.")] = False,
    decode: Annotated[bool, typer.Option(
        "--decode/--no-decode", help="Also measure batch-1 decode, copy bandwidth and the roofline.")] = True,
    kv_memory: Annotated[Optional[str], typer.Option(
        "--kv-memory", help="llmos KV pool budget (bytes, '2GiB' or a fraction of free memory); default: the "
                            "kernel's.")] = None,
    max_batched_tokens: Annotated[Optional[int], typer.Option(
        "--max-batched-tokens", help="llmos per-step token budget; default: the kernel's.")] = None,
    suite: Annotated[str, typer.Option(
        "--suite", help="serving: llmos against transformers (default). kernel: prefix-cache TTFT, fork KV "
                        "footprint, fairness and priority on the real kernel (--model: the model for the first two, "
                        "default llama-110m). train: training tokens/s, llmos's trainer against transformers' "
                        "Trainer and a plain PyTorch loop, with loss curves.")] = "serving",
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="--suite train: optimizer steps per system and round (default 20; 4 with --quick).")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        "--warmup", help="--suite train: first steps left out of tokens/s (default 4; 1 with --quick).")] = None,
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", help="--suite train: runs of every system, order rotated; tokens/s is the median "
                         "(default 3; 1 with --quick).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="--suite train: sequences per step (default 16; 2 with --quick).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="--suite train: tokens per sequence (default 256; 32 with --quick).")] = None,
    img_dir: Annotated[Optional[Path], typer.Option(
        "--img-dir", help="--suite train: where training-loss.png goes (default: --out).")] = None,
) -> None:
    """Benchmark serving throughput and latency (llmos's kernel against transformers' generate modes), the
    kernel's own features (--suite kernel), or training tokens/s (--suite train)."""
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out} exists and is not a directory; give a directory for the results.")
    if suite not in ("serving", "kernel", "train"):
        raise InvalidRequestError(f"--suite {suite!r} is not one of serving, kernel, train.")
    if suite == "train":
        _train_suite(model, systems, seed, threads, out, quick, steps, warmup, rounds, batch_size, seq_len, img_dir)
        return
    if suite == "kernel":
        from llmos.bench.kernel_bench import run_kernel_benchmarks

        if model and len(model) > 1:
            raise InvalidRequestError("--suite kernel takes one --model.")
        run_kernel_benchmarks(out, model=(model or ["tiny" if quick else "llama-110m"])[0], quick=quick)
        return
    from llmos.bench.serving import BenchConfig, run_benchmark

    if systems is None:
        systems = "llmos,hf-sequential,hf-static,hf-continuous"
    config = BenchConfig(models=model, systems=tuple(s.strip() for s in systems.split(",") if s.strip()),
                         requests=requests, seed=seed, threads=threads, out=out, quick=quick, decode=decode,
                         kv_memory=kv_memory, max_num_batched_tokens=max_batched_tokens)
    results = run_benchmark(config)
    failed = [f for m in results["models"] for f in m.get("failed", [])]
    if failed:
        typer.echo(f"error: {len(failed)} run(s) failed (logs in {out / 'logs'}):", err=True)
        for line in failed:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)


def _train_suite(model, systems, seed, threads, out, quick, steps, warmup, rounds, batch_size, seq_len,
                 img_dir) -> None:
    import shlex
    import sys

    from llmos.bench.training_bench import QUICK_SYSTEMS, SYSTEMS, TrainBenchConfig, run_training_benchmark

    if model and len(model) > 1:
        raise InvalidRequestError("--suite train takes one --model (a shape: default or tiny).")
    given = {k: v for k, v in dict(steps=steps, warmup_steps=warmup, rounds=rounds, batch_size=batch_size,
                                   seq_len=seq_len).items() if v is not None}
    if model:
        given["shape"] = model[0]
    if systems is None:
        systems = ",".join(QUICK_SYSTEMS if quick else SYSTEMS)
    names = tuple(s.strip() for s in systems.split(",") if s.strip())
    program = "llmos" if Path(sys.argv[0]).name == "llmos" else f"python {sys.argv[0]}"
    command = " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])
    common = dict(systems=names, seed=seed, threads=threads or 0, out=out, img_dir=img_dir, command=command, **given)
    config = TrainBenchConfig.quick_config(**common) if quick else TrainBenchConfig(**common)
    run_training_benchmark(config)


def main() -> None:
    """`python benchmarks/serving.py ...` without the rest of the CLI: same options, same exit codes."""

    @functools.wraps(bench_command)
    def command(**kwargs) -> None:
        try:
            bench_command(**kwargs)
        except LlmosError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    typer.run(command)
