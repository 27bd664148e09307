"""Train a small Llama-family model from text files, end to end: data -> tokenizer -> tokens -> model -> checkpoint.

Owns the training loop (nanoGPT style: the loop is visible), its schedule, logging and the final
Hugging Face checkpoint. Never defines a model (llmos.model does) and never implements BPE (bpe.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer as HFTokenizer

from llmos.errors import DataError, InvalidRequestError, TrainingDivergedError
from llmos.model.config import ModelConfig
from llmos.model.loader import check_checkpoint_target, save_model
from llmos.model.transformer import build_model
from llmos.train.bpe import DEFAULT_SPECIAL_TOKENS, check_vocab_size, save_tokenizer, train_tokenizer_from_texts
from llmos.train.data import get_batch, pack_documents, read_documents, split_train_val

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Everything one training run needs. `validate()` raises `InvalidRequestError` for bad values."""

    data: list[str] = field(default_factory=list)  # .txt/.md files or folders of them
    out_dir: str = "out"  # the checkpoint directory (replaced atomically at the end)
    tokenizer: str | None = None  # reuse the tokenizer in this directory instead of training one
    vocab_size: int = 8192
    # model shape (Llama family: RoPE, RMSNorm, SwiGLU, grouped-query attention, tied embeddings)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    seq_len: int = 256  # tokens per training window; also the checkpoint's max_position_embeddings
    rope_theta: float = 10000.0
    # optimisation
    batch_size: int = 16  # windows per optimizer step (per micro-step with grad_accum > 1)
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int | None = None  # if set, overrides max_steps: ceil(max_tokens / tokens per step)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 = off
    # evaluation and logging
    val_fraction: float = 0.05
    eval_interval: int = 100  # steps between validation passes (and at the last step)
    eval_steps: int = 20  # validation batches per pass
    log_interval: int = 10  # steps between metrics.jsonl lines
    # reproducibility and the machine
    seed: int = 1337
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 autocast
    save_dtype: str = "float32"  # dtype of the weights in model.safetensors
    num_threads: int = 0  # torch intra-op threads; 0 = all cores
    progress: bool = True  # show a rich progress bar

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.tokens_per_step))
        return self.max_steps

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps", "log_interval")
        flags = {"num_layers": "--layers", "num_heads": "--heads", "num_kv_heads": "--kv-heads"}
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                flag = flags.get(name, "--" + name.replace("_", "-"))
                bad(f"{flag} must be a positive integer, got {getattr(self, name)!r}.")
        if self.hidden_size % self.num_heads:
            bad(f"--hidden-size ({self.hidden_size}) must be a multiple of --heads ({self.num_heads}).")
        if (self.hidden_size // self.num_heads) % 2:
            bad(f"the head size hidden_size/heads = {self.hidden_size // self.num_heads} must be even for RoPE.")
        if self.num_heads % self.num_kv_heads:
            bad(f"--heads ({self.num_heads}) must be a multiple of --kv-heads ({self.num_kv_heads}).")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"--max-tokens must be positive, got {self.max_tokens}.")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "val_fraction"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                bad(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)!r}.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            bad(f"need --lr > 0 and 0 <= --min-lr <= --lr; got lr {self.lr}, min_lr {self.min_lr}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            bad("--warmup-steps, --weight-decay and --grad-clip must not be negative.")
        if not 0 <= self.val_fraction < 0.5:
            bad(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}.")
        if self.dtype not in ("float32", "bfloat16"):
            bad(f"--dtype must be float32 or bfloat16, got {self.dtype!r}.")
        if self.save_dtype not in DTYPES:
            bad(f"--save-dtype must be one of {', '.join(DTYPES)}, got {self.save_dtype!r}.")
        if self.num_threads < 0:
            bad(f"--threads must be >= 0, got {self.num_threads}.")
        if self.tokenizer is None:
            check_vocab_size(self.vocab_size)
        elif not (Path(self.tokenizer) / "tokenizer.json").is_file():
            raise DataError(f"--tokenizer {self.tokenizer} has no tokenizer.json; pass a model or tokenizer directory.")


def get_lr(step: int, c: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    decay_steps = max(1, c.total_steps - c.warmup_steps)
    progress = min(1.0, (step - c.warmup_steps) / decay_steps)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def make_optimizer(model: torch.nn.Module, c: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay on 2-D parameters (matrices, embeddings) only."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)


def model_config_for(c: TrainConfig, vocab_size: int, eot_id: int) -> ModelConfig:
    """The Llama-family `ModelConfig` of a run (tied embeddings, no biases)."""
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
        num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.seq_len, norm_eps=1e-5, rope_theta=c.rope_theta, tie_word_embeddings=True,
        bos_token_id=eot_id, eos_token_ids=[eot_id], torch_dtype=c.save_dtype,
    )


@torch.no_grad()
def estimate_val_loss(model, val: np.ndarray, c: TrainConfig, autocast) -> float:
    """Mean cross-entropy (nats/token) over `eval_steps` validation batches, the same batches every time."""
    model.eval()
    rng = np.random.default_rng(c.seed + 1)
    losses = []
    for _ in range(c.eval_steps):
        batch = get_batch(val, c.batch_size, c.seq_len, rng)
        with autocast:
            logits = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).item())
    model.train()
    return float(np.mean(losses))


class _CheckpointExtras:
    """What `save_model` writes beside the weights: the tokenizer files and the run's logs."""

    def __init__(self, tokenizer, special_tokens, seq_len: int, files: list[Path]) -> None:
        self.tokenizer, self.special_tokens, self.seq_len, self.files = tokenizer, special_tokens, seq_len, files

    def save(self, path: Path) -> None:
        save_tokenizer(self.tokenizer, path, self.seq_len, self.special_tokens)
        for f in self.files:
            if f.is_file():
                shutil.copy2(f, Path(path) / f.name)


def plot_losses(metrics_file: Path, out_png: Path) -> bool:
    """Loss curve PNG from metrics.jsonl, if matplotlib is installed (the `bench` extra). Returns whether written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True


def train(c: TrainConfig) -> dict:
    """Run one training job and write a Hugging Face Llama checkpoint to `c.out_dir`.

    The checkpoint holds config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, train_config.json, metrics.jsonl and (with
    matplotlib) loss.png. It is assembled in a temporary directory and swapped into place, so an
    existing good checkpoint is never left half-overwritten. While running, logs go to
    `.<out_dir name>.training/` beside it (removed when the run ends, however it ends).

    Returns a summary dict (steps, tokens, seconds, final train/val loss, val perplexity, parameters).
    Raises `DataError` (unreadable/empty/binary data, too-small vocabulary, too little text),
    `InvalidRequestError` (bad hyperparameters), `ModelLoadError` (an `out_dir` that is not a new path,
    an empty directory or a previous checkpoint: see `check_checkpoint_target`) and
    `TrainingDivergedError` (a non-finite loss; nothing is saved).
    """
    c.validate()
    out_dir = check_checkpoint_target(c.out_dir)  # fail before any work, not after it
    threads_before = torch.get_num_threads()
    torch.set_num_threads(c.num_threads or os.cpu_count() or 1)
    try:
        return _train(c)
    except BaseException:  # Ctrl-C, divergence, a full disk: the logs go, the old checkpoint stays intact
        shutil.rmtree(out_dir.parent / f".{out_dir.name}.training", ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)


def _train(c: TrainConfig) -> dict:
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    progress, task = _progress_bar(c.progress, c.total_steps)
    say = progress.console.print if c.progress else (lambda *args, **kwargs: None)

    # ---- data and tokenizer -------------------------------------------------------------------
    docs = read_documents(c.data)
    special_tokens = list(DEFAULT_SPECIAL_TOKENS)
    if c.tokenizer:
        tok = HFTokenizer.from_file(str(Path(c.tokenizer) / "tokenizer.json"))
        eos = json.loads((Path(c.tokenizer) / "tokenizer_config.json").read_text()).get("eos_token")
        special_tokens = [(eos.get("content") if isinstance(eos, dict) else eos) or special_tokens[0]]
        if tok.token_to_id(special_tokens[0]) is None:
            raise DataError(f"--tokenizer {c.tokenizer} has no {special_tokens[0]!r} token to separate documents.")
    else:
        tok = train_tokenizer_from_texts(docs, c.vocab_size, special_tokens)
    eot_id = tok.token_to_id(special_tokens[0])
    tokens = pack_documents(docs, tok, eot_id)
    split = split_train_val(tokens, c.val_fraction, c.seq_len)
    say(f"data: {len(docs)} documents, {len(tokens):,} tokens ({len(split.train):,} train, "
        f"{len(split.val):,} validation), vocabulary {tok.get_vocab_size():,}")

    # ---- model and optimizer -------------------------------------------------------------------
    mconfig = model_config_for(c, tok.get_vocab_size(), eot_id)
    model = build_model(mconfig)
    for name, p in model.named_parameters():  # GPT-2's scaled init of the residual projections
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.num_layers))
    model.train()
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    optimizer = make_optimizer(model, c)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.dtype == "bfloat16")
    total_steps = c.total_steps
    say(f"model: {num_params:,} parameters; {total_steps} steps x {c.tokens_per_step:,} tokens "
        f"= {total_steps * c.tokens_per_step:,} tokens")

    # ---- the loop -----------------------------------------------------------------------------
    out_dir = check_checkpoint_target(c.out_dir)
    work = out_dir.parent / f".{out_dir.name}.training"  # logs while running; removed when the run ends
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "train_config.json").write_text(json.dumps(asdict(c), indent=2) + "\n")
    metrics = (work / "metrics.jsonl").open("w")
    t0 = time.perf_counter()
    tokens_seen = 0
    val_loss = None
    train_loss = float("nan")
    with progress:
        for step in range(total_steps):
            lr = get_lr(step, c)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = 0.0
            for _ in range(c.grad_accum):
                batch = get_batch(split.train, c.batch_size, c.seq_len, rng)
                with autocast:
                    logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / c.grad_accum).backward()
                loss_sum += loss.item()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            train_loss = loss_sum / c.grad_accum
            if not math.isfinite(train_loss):
                metrics.close()
                raise TrainingDivergedError(
                    f"training diverged at step {step + 1}: the loss is {train_loss}. Nothing was saved ("
                    f"{out_dir} is unchanged); lower --lr (now {c.lr}) or keep --grad-clip on, and run again.")
            tokens_seen += c.tokens_per_step
            elapsed = time.perf_counter() - t0
            tokens_per_s = tokens_seen / elapsed
            progress.update(task, advance=1, loss=train_loss, tps=tokens_per_s)
            last = step == total_steps - 1
            if (step + 1) % c.log_interval == 0 or last:
                row = {"step": step + 1, "tokens": tokens_seen, "lr": lr, "train_loss": train_loss,
                       "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed, 2)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if len(split.val) and ((step + 1) % c.eval_interval == 0 or last):
                val_loss = estimate_val_loss(model, split.val, c, autocast)
                row = {"step": step + 1, "tokens": tokens_seen, "val_loss": val_loss,
                       "val_perplexity": math.exp(val_loss), "elapsed_s": round(time.perf_counter() - t0, 2)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                say(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"val ppl {math.exp(val_loss):.2f}, {tokens_per_s:,.0f} tokens/s")
    metrics.close()
    train_seconds = time.perf_counter() - t0

    # ---- checkpoint ---------------------------------------------------------------------------
    summary = {"steps": total_steps, "tokens": tokens_seen, "train_seconds": round(train_seconds, 1),
               "train_loss": train_loss, "val_loss": val_loss,
               "val_perplexity": None if val_loss is None else math.exp(val_loss),
               "parameters": num_params, "vocab_size": tok.get_vocab_size(),
               "data_tokens": int(len(tokens)), "train_tokens": int(len(split.train)),
               "val_tokens": int(len(split.val))}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_losses(work / "metrics.jsonl", work / "loss.png")
    model.eval()
    extras = _CheckpointExtras(tok, special_tokens, c.seq_len,
                               [work / n for n in ("train_config.json", "metrics.jsonl", "summary.json", "loss.png")])
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id, "do_sample": True, "temperature": 0.8,
                  "top_p": 0.95, "max_length": c.seq_len}
    save_model(model, mconfig, out_dir, dtype=DTYPES[c.save_dtype], tokenizer=extras, generation_config=generation)
    shutil.rmtree(work, ignore_errors=True)
    say(f"saved {out_dir} ({train_seconds:.0f} s, {tokens_seen:,} tokens)")
    return summary


def _progress_bar(enabled: bool, total: int):
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )
    task = progress.add_task("train", total=total, loss=float("nan"), tps=0.0)
    return progress, task
