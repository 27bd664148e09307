"""`llmos bench`: the serving benchmark, llmos against transformers side by side in one run.

Owns the command-line surface of `llmos.bench.serving.run_benchmark`. Never contains benchmark logic.
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
                        "(tiny with --quick).")] = None,
    systems: Annotated[str, typer.Option(
        "--systems", help="Comma-separated: llmos, hf-sequential, hf-static, hf-continuous, hf-continuous-exact."
    )] = "llmos,hf-sequential,hf-static,hf-continuous",
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
                        "default llama-110m).")] = "serving",
) -> None:
    """Benchmark serving throughput and latency (llmos's kernel against transformers' generate modes), or the
    kernel's own features (--suite kernel)."""
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out} exists and is not a directory; give a directory for the results.")
    if suite not in ("serving", "kernel"):
        raise InvalidRequestError(f"--suite {suite!r} is not one of serving, kernel.")
    if suite == "kernel":
        from llmos.bench.kernel_bench import run_kernel_benchmarks

        if model and len(model) > 1:
            raise InvalidRequestError("--suite kernel takes one --model.")
        run_kernel_benchmarks(out, model=(model or ["tiny" if quick else "llama-110m"])[0], quick=quick)
        return
    from llmos.bench.serving import BenchConfig, run_benchmark

    config = BenchConfig(models=model, systems=tuple(s.strip() for s in systems.split(",") if s.strip()),
                         requests=requests, seed=seed, threads=threads, out=out, quick=quick, decode=decode,
                         kv_memory=kv_memory, max_num_batched_tokens=max_batched_tokens)
    run_benchmark(config)


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
