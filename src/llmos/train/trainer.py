"""Train a language model end to end: data -> tokenizer -> token windows -> model -> Hugging Face checkpoint.

Owns the training loop (nanoGPT style: the loop is visible), its schedule, the run directory
(config.yaml, metrics.jsonl, progress.json, loss.png, checkpoints/last and best, the final weights)
and exact resume. Never defines a model (llmos.model), never implements BPE (bpe.py), never decides
which windows a step reads (loader.py) and never talks to torch.distributed directly (distributed.py).

Run directory (`out_dir`), written by rank 0 only:

    config.yaml      the resolved TrainConfig            metrics.jsonl  train and evaluation rows
    progress.json    rewritten atomically                loss.png       rewritten at every evaluation
    data/            token shards (llmos.train.shards)   checkpoints/tokenizer, checkpoints/last, checkpoints/best
    + at the end: the final Hugging Face checkpoint (config.json, model.safetensors, tokenizer, ...) and summary.json

Exact resume: a batch is a pure function of (seed, step, micro-step) (loader.py), the learning rate a
function of the step, and checkpoints/last holds the fp32 weights, the AdamW state (safetensors) and the
RNG states, so a run killed at any point and resumed from its last checkpoint computes the same losses.
Nothing is ever unpickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer

from llmos.errors import DataError, InvalidRequestError, LlmosError, TrainingDivergedError
from llmos.model.config import ModelConfig
from llmos.model.loader import load_generation_config, load_model
from llmos.model.transformer import build_model
from llmos.train import bpe, shards
from llmos.train import distributed as D
from llmos.train.checkpoint import (RUN_FILES, TOKENIZER_FILES, WRITE_ERRORS, CheckpointWriteError, atomic_write,
                                    check_out_dir, check_resume_config, clean_stale, finish_run, lock_run,
                                    optimizer_state_from, read_trainer_state, set_rng_state, trainer_state,
                                    work_dir, write_checkpoint, write_error)
from llmos.train.config import TrainConfig, checkpoint_arch, save_config
from llmos.train.loader import IGNORE_INDEX, VAL_STREAM, BatchSampler

__all__ = ["TrainConfig", "train", "get_lr", "make_optimizer", "model_config_for", "CheckpointWriteError"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ---- schedule and optimizer -------------------------------------------------------------------------


def get_lr(step: int, c: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr` at the last step
    (SGDR's half-cosine, Loshchilov & Hutter 2017, without restarts)."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    decay_steps = max(1, c.total_steps - c.warmup_steps)
    progress = min(1.0, (step - c.warmup_steps) / decay_steps)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (c.lr - c.min_lr)


def make_optimizer(model: torch.nn.Module, c: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019): decoupled weight decay on 2-D parameters (matrices, embeddings) only.

    `fused`: torch's fused kernel (one call updates every parameter; on CPU the default is a Python loop over
    them), where the device and dtypes allow it; the same update up to rounding.
    """
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)


def fused_loss_module(c: TrainConfig, model: torch.nn.Module, distributed: bool):
    """`llmos.train.fast` when this run can use its fused LM head + chunked cross-entropy (same loss up to
    rounding, without the `[tokens, vocab]` logits): one process (DDP's and FSDP's hooks run in `forward` only),
    no LoRA, a model with `hidden_states` and a bias-free head. None otherwise, or where it is not installed."""
    try:
        from llmos.train import fast
    except ImportError:
        return None
    head = getattr(model, "lm_head", None)
    if (distributed or c.lora_rank > 0 or not hasattr(model, "hidden_states")
            or not isinstance(head, torch.nn.Linear) or head.bias is not None):
        return None
    return fast


def model_config_for(c: TrainConfig, vocab_size: int, eot_id: int) -> ModelConfig:
    """The `ModelConfig` of a model trained from scratch: tied embeddings, context = seq_len.

    llama: no biases, SwiGLU, GQA with `num_kv_heads`. gpt2: biases, GELU (tanh), learned positions,
    MLP width `intermediate_size`. lstm: embedding, `num_layers` LSTM layers of `hidden_size`, linear head.
    """
    common = dict(vocab_size=vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers, tie_word_embeddings=True,
                  bos_token_id=eot_id, eos_token_ids=[eot_id], torch_dtype=c.save_dtype)
    if c.arch == "gpt2":
        return ModelConfig(model_type="gpt2", num_heads=c.num_heads, num_kv_heads=c.num_heads,
                           intermediate_size=c.intermediate_size, max_position_embeddings=c.seq_len, norm_eps=1e-5,
                           attention_bias=True, o_proj_bias=True, mlp_bias=True, hidden_act="gelu_new", **common)
    if c.arch == "lstm":  # the attention fields are placeholders an LSTM config normalises away
        return ModelConfig(model_type="lstm", num_heads=1, num_kv_heads=1, intermediate_size=c.hidden_size,
                           max_position_embeddings=0, **common)
    return ModelConfig(model_type="llama", num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                       intermediate_size=c.intermediate_size, max_position_embeddings=c.seq_len, norm_eps=1e-5,
                       rope_theta=c.rope_theta, **common)


# ---- data ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    train: Any  # a Split (loader.Split): shards.ShardSplit
    val: Any | None
    dir: Path  # holds the tokenizer files and manifest.json
    eot_id: int
    vocab_size: int  # the tokenizer's
    manifest: dict


def prepare_data(c: TrainConfig, out: Path, say: Callable[[str], None], shards_dir: Path | None = None) -> None:
    """Train (or reuse) the tokenizer into `out/checkpoints/tokenizer/` and tokenize `c.data` into token shards
    in `out/data/` (the layout of `llmos.train.shards`; the tokenizer stays out of the shard folder, which
    holds shards only). Both are built in a temporary directory beside `out` and renamed into place, so bad
    data leaves nothing behind, not even `out`.

    Any source format, streaming, SFT masks (`bpe.prepare_tokenizer`, `shards.prepare_shards`).
    `shards_dir`: the shards go there instead, in place: a manifest that matches `c.data` and the settings
    (`shards.prepare_shards`' fingerprint) is reused, anything else is re-prepared.

    Raises `DataError` (missing, empty, binary or too little data; a too-small vocabulary).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        tok_tmp, data_tmp = tmp / "tokenizer", tmp / "data"
        if shards_dir is not None:
            _prepare_shards(c, tok_tmp, shards_dir, say)
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out / "checkpoints" / "tokenizer", ignore_errors=True)
            os.replace(tok_tmp, out / "checkpoints" / "tokenizer")
            return
        _prepare_shards(c, tok_tmp, data_tmp, say)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for src, dst in ((tok_tmp, out / "checkpoints" / "tokenizer"), (data_tmp, out / "data")):
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_shards(c: TrainConfig, tok_dir: Path, data_dir: Path, say: Callable[[str], None]) -> None:
    options = dict(text_field=c.text_field, messages_field=c.messages_field, text_column=c.text_column,
                   label_column=c.label_column, normalize=c.normalize, clean=c.clean, dedup=c.dedup)
    source = c.tokenizer or c.init_from
    tok = bpe.prepare_tokenizer(c.data, tok_dir, vocab_size=c.vocab_size, tokenizer=source, chat_tokens=c.chat_tokens,
                                model_max_length=c.seq_len, **options)
    manifest = shards.prepare_shards(c.data, data_dir, tok, kind="sft" if c.task == "sft" else "lm", seq_len=c.seq_len,
                                     val_fraction=c.val_fraction, progress=c.progress, **options)
    tokens = sum(e["tokens"] for split in manifest["splits"].values() for e in split)
    say(f"data: {manifest['documents']} documents, {tokens:,} tokens, vocabulary {manifest['vocab_size']:,}")


def adopt_tokenizer(c: TrainConfig, data_dir: Path, tok_dir: Path) -> None:
    """For prepared shards (`shards_dir`): copy the tokenizer that made them into `tok_dir`: `c.tokenizer`,
    `c.init_from`, or the finished run the shards belong to (`shards_dir/..`). Raises `DataError` if none
    is found or its vocabulary differs from the shards'."""
    candidates = [Path(p) for p in (c.tokenizer, c.init_from) if p] + [data_dir.parent]
    source = next((p for p in candidates if (p / "tokenizer.json").is_file()), None)
    if source is None:
        raise DataError(f"no tokenizer for the shards in {data_dir}; pass --tokenizer (the run or model whose "
                        "tokenizer prepared them).")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    vocab = HFTokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size()
    if vocab != manifest.get("vocab_size"):
        raise DataError(f"the tokenizer in {source} has {vocab} tokens but the shards in {data_dir} were made with "
                        f"{manifest.get('vocab_size')}; pass --tokenizer with the tokenizer that prepared them.")
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=tok_dir.parent))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)


def open_data(data_dir: Path, tok_dir: Path) -> RunData:
    """The prepared splits of `data_dir` (`shards.ShardSplit`, memory-mapped) and the tokenizer in `tok_dir`."""
    manifest = json.loads((data_dir / "manifest.json").read_text())

    def split(name: str):
        files = [f for f in manifest["splits"].get(name) or [] if f["tokens"] > 0]
        return shards.ShardSplit(data_dir, name) if files else None

    vocab = HFTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    return RunData(split("train"), split("val"), tok_dir, manifest["eot_id"], vocab, manifest)


# ---- model ---------------------------------------------------------------------------------------------


def _finetune():
    try:
        from llmos.train import finetune
    except ImportError:
        raise InvalidRequestError("LoRA (--lora-rank > 0) needs llmos.train.finetune, which this installation "
                                  "lacks; update llmos or train without --lora-rank.") from None
    return finetune


def check_init_from(c: TrainConfig) -> ModelConfig:
    """The `ModelConfig` of `c.init_from`, checked against the run before any work: the same architecture
    as `arch`, and a context of at least `seq_len`. Raises `InvalidRequestError`, `ModelLoadError` (and
    `UnsupportedModelError` for an architecture llmos does not run, e.g. a BERT checkpoint)."""
    mconfig = ModelConfig.from_dir(c.init_from)
    found = checkpoint_arch(c.init_from)
    if found != c.arch:
        raise InvalidRequestError(
            f"--init-from {c.init_from} is a {found!r} checkpoint but --arch is {c.arch!r}; pass --arch {found} "
            "(or leave --arch out: it then follows the checkpoint).")
    if c.tokenizer is None and not (Path(c.init_from) / "tokenizer.json").is_file():
        raise InvalidRequestError(f"--init-from {c.init_from} has no tokenizer.json; pass --tokenizer with the "
                                  "tokenizer the model was trained with.")
    if c.seq_len > mconfig.context_length:
        raise InvalidRequestError(
            f"--seq-len {c.seq_len} is above the context of {c.init_from} ({mconfig.context_length} tokens); "
            f"use --seq-len {mconfig.context_length} or less.")
    return mconfig


def make_model(c: TrainConfig, data: RunData) -> tuple[torch.nn.Module, ModelConfig]:
    """The model before training, in fp32 on CPU: `init_from`'s weights, or a fresh one seeded by `c.seed`
    (normal(0, 0.02), GPT-2's 0.02/sqrt(2 * layers) on residual projections); LoRA-wrapped if asked.
    Raises `InvalidRequestError` for an `init_from` of another architecture than `arch` or a `seq_len`
    above its context, `ModelLoadError` / `UnsupportedModelError` for an unusable checkpoint."""
    if c.init_from:
        mconfig = check_init_from(c)
        if data.vocab_size > mconfig.vocab_size:
            raise InvalidRequestError(
                f"the tokenizer has {data.vocab_size} tokens but {c.init_from} embeds only {mconfig.vocab_size}; "
                "use the checkpoint's own tokenizer (leave --tokenizer out).")
        model, mconfig = load_model(c.init_from)
        model.requires_grad_(True)
    else:
        mconfig = model_config_for(c, data.vocab_size, data.eot_id)
        torch.manual_seed(c.seed)
        model = build_model(mconfig)
        for name, p in model.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.c_proj.weight", "mlp.c_proj.weight")):
                torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.num_layers))
    if c.lora_rank > 0:
        model = _finetune().prepare_model(c, model)
    return model.train(), mconfig


def _exportable(c: TrainConfig, model: torch.nn.Module, adapter_dir: Path | None = None) -> torch.nn.Module:
    """A plain llmos model to write in Hugging Face format: a LoRA model merged on a copy (never in place, so
    training goes on bit for bit). With `lora_merge: false` and `adapter_dir`, the adapter is saved there too."""
    if c.lora_rank <= 0:
        return model
    if adapter_dir is not None and not c.lora_merge:
        return _finetune().finalize_model(c, copy.deepcopy(model), adapter_dir=adapter_dir)
    return _finetune().finalize_model(c, copy.deepcopy(model))


def plot_losses(metrics_file: Path, out_png: Path) -> bool:
    """Loss curve PNG from metrics.jsonl, written atomically, if matplotlib is installed (the `train` extra)."""
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
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_png)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(out_png, e, out_png.parent) from None
    finally:
        plt.close(fig)
    return True


# ---- speed: tokens/s and MFU -----------------------------------------------------------------------------


def flops_per_token(mconfig: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward 2N, backward 4N; Kaplan et al. 2020) plus, for attention,
    12 * layers * hidden * seq_len (QK^T and AV, forward and backward; PaLM, Chowdhery et al. 2022, app. B).
    N counts every parameter once (tied embeddings once), as nanoGPT does."""
    if mconfig.model_type == "lstm":
        return 6.0 * num_params
    attention = 12 * mconfig.num_layers * mconfig.num_heads * mconfig.head_dim * seq_len
    return 6.0 * num_params + attention


_PEAK: dict[tuple[str, str], float] = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """This device's matmul throughput (FLOP/s), measured once per process with a timed `torch.mm`
    (best of 3 after a warm-up; n = 512 on CPU, 4096 on CUDA): the denominator of MFU."""
    key = (str(device), str(dtype))
    if key not in _PEAK:
        n = 4096 if device.type == "cuda" else 512
        gen = torch.Generator(device=device).manual_seed(0)  # never the global RNG: resume must not see this
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        best = float("inf")
        for i in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t)
        _PEAK[key] = 2 * n ** 3 / max(best, 1e-9)
    return _PEAK[key]


# ---- signals: checkpoint and stop --------------------------------------------------------------------------


class StopSignals:
    """SIGUSR1, SIGTERM and SIGINT ask the loop to finish its optimizer step, checkpoint and stop.
    A second SIGINT raises KeyboardInterrupt at once (the last checkpoint stays whole). Installed only in
    the main thread; the previous handlers come back on exit."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None)

    def __init__(self) -> None:
        self.requested: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---- the entry point ------------------------------------------------------------------------------------------


def train(c: TrainConfig) -> dict:
    """Run one training job (or, for `task == "classify"`, `llmos.train.classify.run_classify`).

    Writes the run directory described in the module docstring to `c.out_dir` and, when all steps are
    done, the final Hugging Face checkpoint at its top level (assembled beside it and swapped in whole, so
    an older checkpoint there is never left half-overwritten). Under torchrun every rank calls it; rank 0
    alone writes. A SIGUSR1/SIGTERM/SIGINT checkpoints and returns with `state == "suspended"`.

    Returns a summary dict (state, steps, tokens, seconds, final train/val loss, val perplexity,
    parameters, ...). Raises `DataError` (unreadable/empty/binary data, too-small vocabulary, too little
    text), `InvalidRequestError` (bad settings, a seq_len above the model's context, an init_from of
    another architecture, a resume of a different run), `ModelLoadError` (an `out_dir` that is not a
    run or checkpoint directory), `CheckpointWriteError` (a full disk: the previous checkpoint is intact)
    and `TrainingDivergedError` (a non-finite loss).
    """
    c.validate()
    if c.task == "classify":
        try:
            from llmos.train.classify import run_classify
        except ImportError:
            raise InvalidRequestError("--task classify needs llmos.train.classify, which this installation "
                                      "lacks; update llmos.") from None
        return run_classify(c)
    info = D.init(c.device)
    threads_before = torch.get_num_threads()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(c.num_threads or max(1, (os.cpu_count() or 1) // local_world))
    lock: list = []  # rank 0's open lock file (`checkpoint.lock_run`), held until the run ends
    work = None
    try:
        out, work = map(Path, _on_main(info, lambda: _checks(c, lock)))  # fail before any work, not after it
        if c.batch_size % info.world_size:
            raise InvalidRequestError(f"--batch-size {c.batch_size} is the global batch; it must be a multiple of "
                                      f"the {info.world_size} processes.")
        try:
            return _train_lm(c, work, info, dest=out)
        except WRITE_ERRORS as e:  # a full disk or a read-only directory outside the checkpoint writers
            if isinstance(e, OSError) and e.errno not in _WRITE_ERRNOS:
                raise
            raise write_error(getattr(e, "filename", None) or work, e, work) from None
    except BaseException as e:  # a new run beside a finished one: keep its work dir only to resume it
        if info.is_main and work is not None and work != out and (isinstance(e, TrainingDivergedError) or not (
                work / "checkpoints" / "last" / "trainer_state.json").is_file()):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        for held in lock:
            held.release()
        torch.set_num_threads(threads_before)
        D.shutdown(info)


_WRITE_ERRNOS = {getattr(errno, n) for n in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EFBIG", "EIO")
                 if hasattr(errno, n)}


def _checks(c: TrainConfig, lock: list) -> tuple[str, str]:
    """(out, work dir) of this run, under the run lock (held in `lock`), with stale temporaries cleaned."""
    out = Path(c.out_dir).expanduser().absolute()
    lock.append(lock_run(out))  # first: a second run into `out` stops here, before touching anything
    out = check_out_dir(c)
    clean_stale(out)
    mconfig = check_init_from(c) if c.init_from else None
    if c.lora_rank > 0:  # a bad --lora-targets fails here, before any data is prepared (only the family matters)
        _finetune().lora_target_modules(mconfig or types.SimpleNamespace(model_type=c.arch), c.lora_targets)
    replaces = re.fullmatch(r"\.(.+)\.run-\d+", out.name) if c.resume else None
    if replaces:  # the resumed work directory of a new run into a finished checkpoint: it still replaces that
        dest = out.parent / replaces.group(1)
        lock.append(lock_run(dest))
        return str(dest), str(out)
    return str(out), str(work_dir(out, c.resume))


def _on_main(info: D.DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and make its user error (if any) every rank's error, so none waits forever."""
    error, result, original = None, None, None
    if info.is_main:
        try:
            result = fn()
        except LlmosError as e:
            error, original = (type(e), str(e)), e
    error, result = D.broadcast_object((error, result), info)
    if original is not None:
        raise original
    if error is not None:
        raise error[0](error[1])
    return result


def _train_lm(c: TrainConfig, out: Path, info: D.DistInfo, dest: Path | None = None) -> dict:
    """The run in the directory `out`; at the end its final checkpoint replaces `dest` (default `out`) whole."""
    dest = out if dest is None else dest
    progress, task = _progress_bar(c.progress and info.is_main, c.total_steps)
    say = progress.console.print if (c.progress and info.is_main) else (lambda *args, **kwargs: None)
    last_dir, best_dir = out / "checkpoints" / "last", out / "checkpoints" / "best"
    data_dir = Path(c.shards_dir).expanduser().absolute() if c.shards_dir else out / "data"
    tok_dir = out / "checkpoints" / "tokenizer"  # the run's tokenizer; copied into every checkpoint

    # ---- the run directory, data and tokenizer (rank 0 writes, everyone reads) ----------------------------
    state_meta, state_tensors = (None, None)
    if c.resume:
        state_meta, state_tensors = read_trainer_state(last_dir)
        check_resume_config(c, state_meta["config"])
        _check_resume_data(c, state_meta["config"])

    def setup() -> None:
        if not c.resume:
            fresh = [out / n for n in RUN_FILES if n != "config.yaml" and out / n != data_dir]
            if not c.shards_dir:
                prepare_data(c, out, say)  # first: bad data must leave nothing behind
                fresh = [p for p in fresh if p.name not in ("data", "checkpoints")]
            elif c.data:  # prepare (or reuse, if they match --data and the settings) the shards in shards_dir
                prepare_data(c, out, say, shards_dir=data_dir)
                fresh = [p for p in fresh if p.name != "checkpoints"]
            for p in fresh:  # the files of an earlier run in this directory
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "checkpoints").mkdir(exist_ok=True)
            for p in (out / "checkpoints").iterdir():
                if p.name != "tokenizer":
                    shutil.rmtree(p)
            if c.shards_dir and not c.data:  # shards_dir as it is: the tokenizer that made them
                adopt_tokenizer(c, data_dir, tok_dir)
        save_config(dataclasses.replace(c, resume=False), out / "config.yaml")  # the run, not this invocation
        for need in (data_dir / "manifest.json", tok_dir / "tokenizer.json"):
            if not need.is_file():
                raise DataError(f"{need} is missing, so the run cannot continue on the same tokens; "
                                "start a new run (or restore the file).")
        fingerprint = json.loads((data_dir / "manifest.json").read_text()).get("fingerprint")
        if not c.resume:  # what a resume must find again: the same shards
            atomic_write(out / DATA_RECORD, json.dumps({"shards": str(data_dir), "fingerprint": fingerprint}) + "\n")
        elif (out / DATA_RECORD).is_file():
            recorded = json.loads((out / DATA_RECORD).read_text())
            if recorded.get("fingerprint") != fingerprint:
                raise DataError(f"the shards in {data_dir} were prepared again since this run started (another run "
                                "sharing --shards-dir?), so --resume would continue on other tokens; resume needs "
                                "the shards it started with: prepare them again with the run's settings, or start "
                                f"a new run from the checkpoint with --init-from {last_dir}.")

    _on_main(info, setup)
    data = open_data(data_dir, tok_dir)
    if data.train is None:
        raise DataError(f"{data_dir} has no training split; prepare the data again.")

    # ---- model, optimizer, and the resumed state ----------------------------------------------------------
    random.seed(c.seed)
    np.random.seed(c.seed)
    torch.manual_seed(c.seed)  # also for what init_from does not fix: LoRA's A matrices, a new head
    model, mconfig = make_model(c, data)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if state_meta is not None:
        if c.lora_rank > 0:  # the adapters live in the trainer state; the base weights come from init_from
            adapters = {n[len("model/"):]: t for n, t in state_tensors.items() if n.startswith("model/")}
            if set(adapters) != set(trainable_names):
                raise InvalidRequestError(
                    f"{last_dir} holds adapters for {sorted(adapters)[:3]}..., but this model trains "
                    f"{sorted(trainable_names)[:3]}...; resume with the run's own settings.")
            model.load_state_dict(adapters, strict=False)
        else:
            saved, _ = load_model(last_dir)
            model.load_state_dict(saved.state_dict())
            del saved
        set_rng_state(state_meta["rng"], state_tensors)
    unique = {id(p): p for p in model.parameters()}.values()
    num_params = sum(p.numel() for p in unique)  # the model trained (with LoRA: base + adapters), for FLOPs
    trainable_params = sum(p.numel() for p in unique if p.requires_grad)
    # the saved model's count: a LoRA model is saved merged, so its adapters (and only they) drop out
    saved_params = num_params - trainable_params if c.lora_rank > 0 else num_params
    model.to(info.device)
    wrapped = D.wrap(model, info, c.dist)
    optimizer = make_optimizer(wrapped, c, fused=not info.distributed)
    if state_meta is not None:
        D.load_optimizer_state(wrapped, optimizer, optimizer_state_from(state_meta, state_tensors))
    fast = fused_loss_module(c, model, info.distributed)
    forward = wrapped
    if c.compile:  # with the fused loss, only the body (hidden_states) is compiled; the head + loss stay fused
        forward = fast.compile_model(model) if fast is not None else torch.compile(wrapped)
    use_bf16 = c.dtype == "bfloat16" or (c.dtype == "auto" and info.device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    if c.dtype == "bfloat16" and info.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidRequestError("--dtype bfloat16: this GPU does not support bf16; use --dtype float32.")
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    generation = load_generation_config(c.init_from) if c.init_from else {}
    generation = generation or {"bos_token_id": data.eot_id, "eos_token_id": data.eot_id, "do_sample": True,
                                "temperature": 0.8, "top_p": 0.95, "max_length": c.seq_len}

    sampler = BatchSampler(data.train, c.batch_size, c.seq_len, c.seed, rank=info.rank, world_size=info.world_size)
    val_sampler = None
    if data.val is not None:
        val_sampler = BatchSampler(data.val, c.batch_size, c.seq_len, c.seed, stream=VAL_STREAM, rank=info.rank,
                                   world_size=info.world_size)
    total_steps = c.total_steps
    fpt = flops_per_token(mconfig, num_params, c.seq_len)
    peak = peak_flops(info.device, torch.bfloat16 if use_bf16 else torch.float32) * info.world_size

    start = 0 if state_meta is None else state_meta["step"]
    tokens_seen = 0 if state_meta is None else state_meta["tokens"]
    best_val = None if state_meta is None else state_meta["best_val_loss"]
    elapsed_before = 0.0 if state_meta is None else state_meta["elapsed_s"]
    val_loss = None if state_meta is None else state_meta.get("val_loss")
    train_loss = float("nan") if state_meta is None else state_meta.get("train_loss", float("nan"))
    del state_tensors
    metrics_file = out / "metrics.jsonl"
    if info.is_main:  # a resumed run forgets the rows logged after its checkpoint
        rows = metrics_file.read_text().splitlines() if (c.resume and metrics_file.is_file()) else []
        atomic_write(metrics_file, "".join(r + "\n" for r in rows if r.strip() and json.loads(r)["step"] <= start))
    metrics = metrics_file.open("a") if info.is_main else None
    counted_as = f"{saved_params:,} parameters" + (f", {trainable_params:,} trainable (LoRA)" if c.lora_rank > 0 else "")
    say(f"model: {mconfig.model_type}, {counted_as}; {total_steps} steps x {c.tokens_per_step:,} tokens "
        f"= {total_steps * c.tokens_per_step:,} tokens on {info.world_size} x {info.device.type}"
        + (f"; resuming at step {start}" if start else ""))

    def log(row: dict) -> None:
        if metrics is not None:
            try:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            except OSError as e:
                raise write_error(metrics_file, e, out) from None

    def write_progress(state: str, step: int, tokens_per_s: float) -> None:
        if not info.is_main:
            return
        eta = (total_steps - step) * c.tokens_per_step / tokens_per_s if tokens_per_s > 0 else None
        atomic_write(out / "progress.json", json.dumps({
            "step": step, "total_steps": total_steps, "tokens": tokens_seen, "train_loss": _finite(train_loss),
            "val_loss": val_loss, "tokens_per_s": round(tokens_per_s, 1),
            "eta_s": None if eta is None else round(eta, 1), "state": state,
            "mfu": round(fpt * tokens_per_s / peak, 4), "pid": os.getpid(), "time": time.time()}) + "\n")

    def save_last(step: int) -> None:
        """checkpoints/last after `step` completed steps (collective: every rank gathers its shard)."""
        fsdp = D.is_fsdp(wrapped)  # under FSDP these are collectives: every rank takes part
        full = D.full_model_state(wrapped) if fsdp or c.lora_rank > 0 else None
        opt_state = D.full_optimizer_state(wrapped, optimizer)
        if not info.is_main:
            D.barrier(info)
            return
        plain = _plain_model(c, data, mconfig, model, full, wrapped)
        trainable = {n: full[n] for n in trainable_names} if c.lora_rank > 0 else None
        scalars = {"step": step, "tokens": tokens_seen, "best_val_loss": best_val, "val_loss": val_loss,
                   "train_loss": _finite(train_loss), "elapsed_s": elapsed_before + time.perf_counter() - t0,
                   "world_size": info.world_size, "total_steps": total_steps, "lr_next": get_lr(step, c),
                   "data": {"rule": "loader.BatchSampler (seed, step, micro-step)", "next_step": step},
                   "config": c.to_dict()}
        meta, tensors = trainer_state(opt_state, trainable, scalars)

        def extra(d: Path) -> None:
            save_file(tensors, str(d / "trainer_state.safetensors"))
            (d / "trainer_state.json").write_text(json.dumps(meta) + "\n")

        try:
            write_checkpoint(last_dir, _exportable(c, plain), mconfig, torch.float32, data.dir, generation, extra)
        finally:
            D.barrier(info)

    # ---- the loop -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    session_tokens = 0
    tokens_per_s = 0.0
    state = "running"
    wrapped.train()
    write_progress(state, start, 0.0)
    stop = StopSignals()  # also while the final checkpoint is written: a signal then waits for it
    with stop:
        done = start
        try:
            with progress:
                progress.update(task, completed=start)
                step = start
                for step in range(start, total_steps):
                    lr = get_lr(step, c)
                    for group in optimizer.param_groups:
                        group["lr"] = lr

                    counted = sampler.global_targets(step, c.grad_accum)  # the loss is the mean over these tokens
                    loss_sum = 0.0
                    for micro in range(c.grad_accum):
                        batch = sampler.batch(step, micro)
                        x, y = batch.inputs.to(info.device), batch.targets.to(info.device)
                        with _grad_sync(wrapped, micro == c.grad_accum - 1):
                            with autocast:  # loss = the sum over this micro-batch's counted targets
                                if fast is not None and batch.num_targets:
                                    loss = fast.causal_lm_loss(model, x, y) * batch.num_targets
                                else:
                                    loss = F.cross_entropy(forward(x).float().flatten(0, 1), y.flatten(),
                                                           ignore_index=IGNORE_INDEX, reduction="sum")
                            (loss * (info.world_size / max(1, counted))).backward()  # DDP/FSDP average over ranks
                        loss_sum += loss.item()
                    if c.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), c.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                    total, stops = D.all_reduce_sum([loss_sum, float(stop.requested is not None)], info)
                    train_loss = total / max(1, counted)
                    if not math.isfinite(train_loss):
                        raise TrainingDivergedError(
                            f"training diverged at step {step + 1}: the loss is {train_loss}. Nothing new was saved ("
                            + (f"{last_dir} holds the last good checkpoint, if any" if dest == out else
                               f"{dest} is untouched") + f"); lower --lr (now {c.lr}) or keep "
                            "--grad-clip on, and start again.")
                    tokens_seen += c.tokens_per_step
                    session_tokens += c.tokens_per_step
                    elapsed = time.perf_counter() - t0
                    tokens_per_s = session_tokens / elapsed
                    mfu = fpt * tokens_per_s / peak
                    progress.update(task, completed=step + 1, loss=train_loss, tps=tokens_per_s, mfu=100 * mfu)
                    done = step + 1
                    last = done == total_steps
                    stopping = stops > 0
                    if done % c.log_interval == 0 or last or stopping:
                        log({"step": done, "tokens": tokens_seen, "lr": lr, "train_loss": train_loss,
                             "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(elapsed_before + elapsed, 2),
                             "mfu": round(mfu, 4)})
                        write_progress(state, done, tokens_per_s)
                        if not progress.console.is_terminal:  # a log file (`llmos logs JOB`): a plain line instead
                            say(f"step {done}/{total_steps}: train loss {train_loss:.4f}, "
                                f"{tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%")
                    evaluated = False
                    if val_sampler is not None and (done % c.eval_interval == 0 or last):
                        val_loss = estimate_val_loss(forward, val_sampler, c, autocast, info)
                        evaluated = True
                        log({"step": done, "tokens": tokens_seen, "val_loss": val_loss,
                             "val_perplexity": math.exp(val_loss),
                             "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 2)})
                        say(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                            f"val ppl {math.exp(val_loss):.2f}, {tokens_per_s:,.0f} tokens/s")
                        if best_val is None or val_loss < best_val:
                            best_val = val_loss
                            full = D.full_model_state(wrapped) if D.is_fsdp(wrapped) else None
                            if info.is_main:
                                plain = _plain_model(c, data, mconfig, model, full, wrapped)
                                note = {"step": done, "val_loss": val_loss, "val_perplexity": math.exp(val_loss)}
                                write_checkpoint(best_dir, _exportable(c, plain), mconfig, DTYPES[c.save_dtype],
                                                 data.dir, generation,
                                                 lambda d: (d / "eval.json").write_text(json.dumps(note) + "\n"))
                            D.barrier(info)
                        if info.is_main:
                            plot_losses(metrics_file, out / "loss.png")
                    if evaluated or last or stopping or (c.save_interval and done % c.save_interval == 0):
                        save_last(done)
                        write_progress(state, done, tokens_per_s)
                    if stopping and not last:
                        state = "suspended"
                        break
        except KeyboardInterrupt:  # a second Ctrl-C: checkpoints/last holds the last saved step
            _best_effort(lambda: write_progress("suspended", done, tokens_per_s))
            raise
        except BaseException:
            _best_effort(lambda: write_progress("failed", done, tokens_per_s))
            raise
        finally:
            if metrics is not None:
                metrics.close()
        train_seconds = elapsed_before + time.perf_counter() - t0
        summary = {"state": "finished" if state == "running" else state, "steps": done,
                   "total_steps": total_steps, "tokens": tokens_seen, "train_seconds": round(train_seconds, 1),
                   "train_loss": _finite(train_loss), "val_loss": val_loss,
                   "val_perplexity": None if val_loss is None else math.exp(val_loss), "best_val_loss": best_val,
                   "parameters": saved_params, "trainable_parameters": trainable_params, "vocab_size": data.vocab_size,
                   "data_tokens": sum(s["tokens"] for split in data.manifest["splits"].values() for s in split),
                   "train_tokens": len(data.train), "val_tokens": 0 if data.val is None else len(data.val),
                   "out_dir": str(dest)}
        if state == "suspended":
            write_progress("suspended", summary["steps"], tokens_per_s)
            summary["message"] = (f"suspended at step {summary['steps']} of {total_steps}; continue with "
                                  f"`llmos train --out {out} --resume`"
                                  + (f" ({dest} keeps the finished run this one was to replace)" if dest != out
                                     else ""))
            say(summary["message"])
            return summary

        # ---- the final checkpoint: Hugging Face weights at the top of the run directory -------------------------
        full = D.full_model_state(wrapped) if D.is_fsdp(wrapped) else None
        if info.is_main:
            try:
                atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
                plot_losses(metrics_file, out / "loss.png")
                plain = _plain_model(c, data, mconfig, model, full, wrapped)
                finish_run(out, _exportable(c, plain, out / "adapter"), mconfig, DTYPES[c.save_dtype], data.dir,
                           generation, dest)
                out = dest  # the final checkpoint is at `dest` now, with progress.json
            except BaseException:
                _best_effort(lambda: write_progress("failed", total_steps, tokens_per_s))
                raise
            write_progress("finished", total_steps, tokens_per_s)
            say(f"saved {out} ({train_seconds:.0f} s, {tokens_seen:,} tokens)")
        D.barrier(info)
        return summary


DATA_RECORD = "data.json"  # in the run directory while it runs: the fingerprint of the shards it trains on


def _check_resume_data(c: TrainConfig, saved: dict) -> None:
    """`--resume` with `--data` naming other files than the run's is refused (it would train on the run's shards
    while its config.yaml claimed otherwise). Raises `InvalidRequestError`."""
    def norm(paths) -> list[str]:
        return [str(Path(p).expanduser().absolute()) for p in paths or []]

    if c.data and saved.get("data") is not None and norm(c.data) != norm(saved["data"]):
        raise InvalidRequestError(
            f"--resume continues the same run on the same data, but --data {', '.join(map(str, c.data))} differs "
            f"from the run's ({', '.join(map(str, saved['data']))}); drop --data, or start a new run from the "
            f"checkpoint with --init-from {Path(c.out_dir) / 'checkpoints' / 'last'}.")


def _best_effort(fn: Callable[[], None]) -> None:
    """Run `fn`, ignoring a failed write (e.g. the full disk that is the reason we are failing)."""
    try:
        fn()
    except (*WRITE_ERRORS, CheckpointWriteError):
        pass


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@contextlib.contextmanager
def _grad_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step (DDP `no_sync`, FSDP2 gradient sync off)."""
    if not sync and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
        return
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    yield


def _plain_model(c: TrainConfig, data: RunData, mconfig: ModelConfig, model: torch.nn.Module,
                 full: dict | None, wrapped: torch.nn.Module) -> torch.nn.Module:
    """The trained model as one plain CPU module: itself, or (FSDP) a fresh copy loaded with the gathered state."""
    if not D.is_fsdp(wrapped):
        return model
    with torch.device("cpu"):
        fresh = make_model(c, data)[0] if c.lora_rank > 0 else build_model(mconfig)
    fresh.load_state_dict(full)
    return fresh


@torch.no_grad()
def estimate_val_loss(forward, sampler: BatchSampler, c: TrainConfig, autocast, info: D.DistInfo) -> float:
    """Mean cross-entropy (nats per counted target token) over the `eval_steps` fixed validation batches."""
    was_training = forward.training
    forward.eval()
    total, count = 0.0, 0
    for i in range(c.eval_steps):
        batch = sampler.batch(i, 0)
        with autocast:
            logits = forward(batch.inputs.to(info.device))
        total += F.cross_entropy(logits.float().flatten(0, 1), batch.targets.to(info.device).flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += batch.num_targets
    forward.train(was_training)
    total, count = D.all_reduce_sum([total, float(count)], info)
    return total / max(1.0, count)


def _progress_bar(enabled: bool, total: int):
    progress = Progress(
        TextColumn("[bold]train step"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("MFU {task.fields[mfu]:.1f}%"), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )
    task = progress.add_task("train", total=total, loss=float("nan"), tps=0.0, mfu=0.0)
    return progress, task
