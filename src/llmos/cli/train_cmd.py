"""`llmos train`: train a small Llama-family model on text files and write a Hugging Face checkpoint.

Owns the command-line surface of `llmos.train.trainer.train`. Never contains training logic.
Registered by `llmos.cli.main` as `app.command("train")(train_command)`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.errors import LlmosError
from llmos.train.trainer import TrainConfig, train


def train_command(
    data: Annotated[list[Path], typer.Option("--data", help="A .txt/.md file or a folder of them (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write: a new path, an empty directory, or a previous checkpoint (replaced atomically).")],
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", help="Reuse the tokenizer in this directory instead of training one.")] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="BPE vocabulary size (>= 257).")] = 8192,
    hidden_size: Annotated[int, typer.Option("--hidden-size", help="Model width.")] = 256,
    layers: Annotated[int, typer.Option("--layers", help="Decoder layers.")] = 4,
    heads: Annotated[int, typer.Option("--heads", help="Attention heads.")] = 8,
    kv_heads: Annotated[int, typer.Option("--kv-heads", help="Key/value heads (grouped-query attention).")] = 4,
    intermediate_size: Annotated[int, typer.Option("--intermediate-size", help="SwiGLU hidden width.")] = 768,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training window (= context length).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per step.")] = 16,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 1000,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Train on this many tokens instead (overrides --max-steps).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-3,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Learning rate at the end of the cosine decay.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps.")] = 100,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW decay on matrices.")] = 0.1,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Max gradient norm (0 = off).")] = 1.0,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of tokens held out.")] = 0.05,
    eval_interval: Annotated[int, typer.Option("--eval-interval", help="Steps between validations.")] = 100,
    eval_steps: Annotated[int, typer.Option("--eval-steps", help="Batches per validation.")] = 20,
    log_interval: Annotated[int, typer.Option("--log-interval", help="Steps between metrics.jsonl lines.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed for weights and batches.")] = 1337,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16.")] = "float32",
    save_dtype: Annotated[str, typer.Option(
        "--save-dtype", help="Checkpoint weight dtype: float32, bfloat16 or float16.")] = "float32",
    threads: Annotated[int, typer.Option("--threads", help="CPU threads (0 = all cores).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar or log lines.")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Run it as a job on the daemon (LLMOS_HOST); prints its id (`llmos ps` shows it).")] = False,
) -> None:
    """Train a byte-level BPE tokenizer and a Llama-family model on text, and save a Hugging Face checkpoint."""
    config = TrainConfig(
        data=[str(p) for p in data], out_dir=str(out), tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=intermediate_size, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, max_tokens=max_tokens, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, val_fraction=val_fraction, eval_interval=eval_interval,
        eval_steps=eval_steps, log_interval=log_interval, seed=seed, dtype=dtype, save_dtype=save_dtype,
        num_threads=threads, progress=not quiet,
    )
    if detach:
        from llmos.cli.jobs_cmd import submit

        return submit(config)
    summary = train(config)
    if not quiet:
        ppl = summary["val_perplexity"]
        typer.echo(f"wrote {out}: {summary['parameters']:,} parameters, {summary['tokens']:,} tokens, "
                   f"{summary['train_seconds']:.0f} s" + (f", validation perplexity {ppl:.2f}" if ppl else ""))


def main() -> None:
    """`python -m llmos.cli.train_cmd ...` without the rest of the CLI: same options, same exit codes."""

    @functools.wraps(train_command)
    def command(**kwargs) -> None:
        try:
            train_command(**kwargs)
        except LlmosError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    typer.run(command)


if __name__ == "__main__":
    main()
