"""`llmos train`: train, continue or fine-tune a model from a config file and flags; write a Hugging Face checkpoint.

Owns the command-line surface of `llmos.train.trainer.train`: resolving --config / --set / flags into one
TrainConfig, `--nproc N` (re-launch under torchrun) and `--detach` (hand the run to the daemon).
Never contains training logic. Registered by `llmos.cli.main` as a lazy command (`train_command`).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.errors import InvalidRequestError, LlmosError

Opt = typer.Option


def train_command(
    config: Annotated[Optional[Path], Opt("--config", help="A YAML or TOML file of training settings (keys: the TrainConfig fields).")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override one setting: --set key=value (repeatable; value parsed as YAML).")] = None,
    data: Annotated[Optional[list[Path]], Opt("--data", help="A data file or folder (repeatable).")] = None,
    out: Annotated[Optional[Path], Opt("--out", help="The run directory; the final checkpoint lands at its top.")] = None,
    arch: Annotated[Optional[str], Opt("--arch", help="llama, gpt2 or lstm (from scratch; follows --init-from otherwise).")] = None,
    task: Annotated[Optional[str], Opt("--task", help="lm, sft or classify.")] = None,
    init_from: Annotated[Optional[Path], Opt("--init-from", help="Start from this checkpoint directory (weights and tokenizer).")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue <out>/checkpoints/last exactly (settings from <out>/config.yaml).")] = False,
    nproc: Annotated[Optional[int], Opt("--nproc", help="Train with N local processes (launches torchrun).")] = None,
    dist: Annotated[Optional[str], Opt("--dist", help="ddp or fsdp (with --nproc / torchrun).")] = None,
    compile_: Annotated[Optional[bool], Opt("--compile/--no-compile", help="torch.compile the model.")] = None,
    detach: Annotated[bool, Opt("--detach", help="Run as a job of the daemon (see `llmos ps`, `llmos logs`).")] = False,
    tokenizer: Annotated[Optional[Path], Opt("--tokenizer", help="Reuse the tokenizer in this directory instead of training one.")] = None,
    text_field: Annotated[Optional[str], Opt("--text-field", help="JSONL field with the text (default text).")] = None,
    messages_field: Annotated[Optional[str], Opt("--messages-field", help="JSONL field with chat messages, --task sft (default messages).")] = None,
    text_column: Annotated[Optional[str], Opt("--text-column", help="CSV column with the text (default text).")] = None,
    label_column: Annotated[Optional[str], Opt("--label-column", help="CSV column with the label, --task classify (default label).")] = None,
    normalize: Annotated[Optional[str], Opt("--normalize", help="Unicode normalization of the text: none, nfc or nfkc.")] = None,
    clean: Annotated[Optional[bool], Opt("--clean/--no-clean", help="Strip control characters, normalise newlines, collapse blank runs.")] = None,
    dedup: Annotated[Optional[bool], Opt("--dedup/--no-dedup", help="Drop exact duplicate documents (default on).")] = None,
    chat_tokens: Annotated[Optional[bool], Opt("--chat-tokens/--no-chat-tokens", help="Add <|im_start|>/<|im_end|> and a ChatML template to a new tokenizer.")] = None,
    shards_dir: Annotated[Optional[Path], Opt("--shards-dir", help="Prepared token shards to reuse (default <out>/data).")] = None,
    vocab_size: Annotated[Optional[int], Opt("--vocab-size", help="BPE vocabulary size (>= 257).")] = None,
    hidden_size: Annotated[Optional[int], Opt("--hidden-size", help="Model width.")] = None,
    layers: Annotated[Optional[int], Opt("--layers", help="Decoder (or LSTM) layers.")] = None,
    heads: Annotated[Optional[int], Opt("--heads", help="Attention heads.")] = None,
    kv_heads: Annotated[Optional[int], Opt("--kv-heads", help="Key/value heads (grouped-query attention).")] = None,
    intermediate_size: Annotated[Optional[int], Opt("--intermediate-size", help="MLP hidden width.")] = None,
    seq_len: Annotated[Optional[int], Opt("--seq-len", help="Tokens per training window (<= the model's context).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Windows per micro-step, all processes together.")] = None,
    grad_accum: Annotated[Optional[int], Opt("--grad-accum", help="Micro-steps per optimizer step.")] = None,
    max_steps: Annotated[Optional[int], Opt("--max-steps", help="Optimizer steps.")] = None,
    max_tokens: Annotated[Optional[int], Opt("--max-tokens", help="Train on this many tokens instead (overrides --max-steps).")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Peak learning rate.")] = None,
    min_lr: Annotated[Optional[float], Opt("--min-lr", help="Learning rate at the end of the cosine decay.")] = None,
    warmup_steps: Annotated[Optional[int], Opt("--warmup-steps", help="Linear warmup steps.")] = None,
    weight_decay: Annotated[Optional[float], Opt("--weight-decay", help="AdamW decay on matrices.")] = None,
    grad_clip: Annotated[Optional[float], Opt("--grad-clip", help="Max gradient norm (0 = off).")] = None,
    val_fraction: Annotated[Optional[float], Opt("--val-fraction", help="Share of tokens held out.")] = None,
    eval_interval: Annotated[Optional[int], Opt("--eval-interval", help="Steps between validations.")] = None,
    eval_steps: Annotated[Optional[int], Opt("--eval-steps", help="Batches per validation.")] = None,
    log_interval: Annotated[Optional[int], Opt("--log-interval", help="Steps between metrics.jsonl lines.")] = None,
    save_interval: Annotated[Optional[int], Opt("--save-interval", help="Steps between resumable checkpoints (0 = at evaluations).")] = None,
    seed: Annotated[Optional[int], Opt("--seed", help="Seed for weights and batches.")] = None,
    dtype: Annotated[Optional[str], Opt("--dtype", help="Compute dtype: auto, float32 or bfloat16.")] = None,
    save_dtype: Annotated[Optional[str], Opt("--save-dtype", help="Checkpoint weight dtype: float32, bfloat16 or float16.")] = None,
    device: Annotated[Optional[str], Opt("--device", help="auto, cpu or cuda.")] = None,
    threads: Annotated[Optional[int], Opt("--threads", help="CPU threads per process (0 = all cores).")] = None,
    lora_rank: Annotated[Optional[int], Opt("--lora-rank", help="LoRA rank (0 = full fine-tuning).")] = None,
    lora_alpha: Annotated[Optional[float], Opt("--lora-alpha", help="LoRA scale numerator (scale = alpha / rank).")] = None,
    lora_dropout: Annotated[Optional[float], Opt("--lora-dropout", help="Dropout on the LoRA input, in [0, 1).")] = None,
    lora_targets: Annotated[Optional[str], Opt("--lora-targets", help="Comma-separated module names to adapt (e.g. q_proj,v_proj).")] = None,
    lora_merge: Annotated[Optional[bool], Opt("--lora-merge/--no-lora-merge", help="Merge the adapters into the weights when saving.")] = None,
    beta1: Annotated[Optional[float], Opt("--beta1", help="AdamW beta1.")] = None,
    beta2: Annotated[Optional[float], Opt("--beta2", help="AdamW beta2.")] = None,
    zero_shot: Annotated[Optional[bool], Opt("--zero-shot", help="--task classify: score the labels, no training.")] = None,
    quiet: Annotated[bool, Opt("--quiet", help="No progress bar or log lines.")] = False,
) -> None:
    """Train a language model (llama, gpt2 or lstm) from text, or continue / fine-tune a checkpoint.

    Settings: --config FILE (YAML or TOML), then --set key=value, then the flags; later ones win.

    The run directory (--out) gets config.yaml, metrics.jsonl, progress.json, loss.png, checkpoints/.

    SIGUSR1, SIGTERM or Ctrl-C checkpoint and stop the run; --resume continues it exactly.
    """
    from llmos.train import distributed
    from llmos.train.config import load_config, save_config

    flags = dict(
        data=[str(p) for p in data] if data else None, out_dir=str(out) if out else None, arch=arch, task=task,
        init_from=str(init_from) if init_from else None, resume=True if resume else None, nproc=nproc, dist=dist,
        compile=compile_, tokenizer=str(tokenizer) if tokenizer else None, text_field=text_field,
        messages_field=messages_field, text_column=text_column, label_column=label_column, normalize=normalize,
        clean=clean, dedup=dedup, chat_tokens=chat_tokens, shards_dir=str(shards_dir) if shards_dir else None,
        vocab_size=vocab_size,
        hidden_size=hidden_size, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=intermediate_size, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, max_tokens=max_tokens, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, val_fraction=val_fraction, eval_interval=eval_interval,
        eval_steps=eval_steps, log_interval=log_interval, save_interval=save_interval, seed=seed, dtype=dtype,
        save_dtype=save_dtype, device=device, num_threads=threads, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=lora_targets, lora_merge=lora_merge, beta1=beta1, beta2=beta2,
        zero_shot=zero_shot,
        progress=False if quiet else None,
    )
    source = config
    if resume and config is None:  # `llmos train --out RUN --resume`: the run's own settings
        if out is None:
            raise InvalidRequestError("--resume needs --out RUN_DIR (or --config with out_dir).")
        source = out / "config.yaml"
        if not source.is_file():
            raise InvalidRequestError(f"nothing to resume: {source} does not exist; pass the --out of an earlier run.")
    resolved = load_config(source, set_ or [], **flags)
    if not resolved.data and not resolved.shards_dir and not resolved.resume and not (resolved.task == "classify"):
        raise InvalidRequestError("no training data given; pass --data FILE_OR_FOLDER (or data: in --config).")
    resolved.validate()

    if detach:
        try:
            from llmos.cli.jobs_cmd import submit
        except ImportError:
            raise InvalidRequestError("--detach needs the daemon's job support (llmos.cli.jobs_cmd), which this "
                                      "installation lacks; run without --detach.") from None
        submit(resolved)
        return
    if resolved.nproc > 1 and not distributed.under_torchrun():
        preflight(resolved)
        tmp = Path(tempfile.mkdtemp(prefix="llmos-train-"))
        try:
            save_config(resolved, tmp / "config.yaml")
            status = distributed.launch(resolved.nproc, ["--config", str(tmp / "config.yaml")]
                                        + (["--quiet"] if quiet else []),
                                        progress_file=Path(resolved.out_dir) / "progress.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if status:
            raise typer.Exit(status)
        return

    from llmos.train.trainer import train

    try:  # a training process keeps its large tensors' pages between steps (see llmos.train.fast)
        from llmos.train.fast import tune_allocator

        tune_allocator()
    except ImportError:
        pass
    summary = train(resolved)
    if quiet or (distributed.under_torchrun() and int(__import__("os").environ.get("RANK", "0")) != 0):
        return
    if summary.get("state") == "suspended":  # where and how to continue (said already with a progress bar)
        if not resolved.progress:
            typer.echo(summary["message"])
        return
    line = summary_line(resolved.out_dir, summary)
    if line:
        typer.echo(line)


def preflight(c) -> None:
    """The cheap checks of a `--nproc N` run, in the launcher before torchrun starts, so that a user error is
    one `error:` line (exit 2) rather than one per rank: the batch divides over the processes, the run
    directory may be used, --init-from is a usable checkpoint, and every data file exists, is readable and is
    not empty. Raises `InvalidRequestError`, `DataError` or `ModelLoadError`; the ranks check again."""
    from llmos.errors import DataError
    from llmos.train.checkpoint import check_out_dir

    if c.batch_size % c.nproc:
        raise InvalidRequestError(f"--batch-size {c.batch_size} is the global batch; it must be a multiple of "
                                  f"the {c.nproc} processes (--nproc).")
    check_out_dir(c)
    if c.init_from:
        from llmos.train.trainer import check_init_from

        check_init_from(c)
    if c.resume or c.shards_dir:  # the data was prepared into shards already
        return
    from llmos.train.sources import collect_data_files

    for path in collect_data_files(c.data):
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}); fix its permissions or remove it "
                            "from --data.") from None
        if not head.strip() and path.stat().st_size <= len(head):
            raise DataError(f"{path} is empty; remove it from --data or put text in it.")


def summary_line(out_dir: str, summary: dict) -> str | None:
    """The last line a finished run prints: for --task classify the held-out accuracy (the summary of
    `llmos.train.classify.run_classify`), else parameters, tokens and validation perplexity; None when the
    summary has nothing to report."""
    if summary.get("task") == "classify" and "accuracy" in summary:
        mode = "zero-shot" if summary.get("mode") == "zero-shot" else f"{summary.get('steps', 0)} steps"
        return (f"wrote {out_dir}: accuracy {summary['accuracy']:.3f} on {summary.get('val_examples', 0):,} "
                f"held-out rows ({mode}, {summary.get('seconds', 0):.0f} s)")
    if "parameters" not in summary:
        return None
    ppl = summary.get("val_perplexity")
    parts = [f"{summary['parameters']:,} parameters"]
    if "tokens" in summary:
        parts.append(f"{summary['tokens']:,} tokens")
    if "train_seconds" in summary:
        parts.append(f"{summary['train_seconds']:.0f} s")
    if ppl:
        parts.append(f"validation perplexity {ppl:.2f}")
    return f"wrote {out_dir}: " + ", ".join(parts)


def main() -> None:
    """`python -m llmos.cli.train_cmd ...` without the rest of the CLI: same options, same exit codes
    (0 also when a signal checkpointed and stopped the run; 2 with one `error:` line for a user error)."""

    @functools.wraps(train_command)
    def command(**kwargs) -> None:
        try:
            train_command(**kwargs)
        except LlmosError as e:
            from llmos.train.distributed import report_rank_error

            if not report_rank_error(e):  # a rank of `--nproc N`: the launcher prints it, once
                typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    typer.run(command)


if __name__ == "__main__":
    main()
