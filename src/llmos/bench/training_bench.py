"""The training benchmark (issue 5): llmos's trainer against transformers' `Trainer` and a plain PyTorch loop,
side by side in one run: the same Llama shape, initial weights, batches (in the same order), optimizer, schedule,
clipping, fp32 and thread count.

Owns the workload (shape, token stream, batches, the initial checkpoint), the timed jobs (each system alone in
a fresh process: `python -m llmos.bench.training_bench SPEC OUT`), and the report (table, loss-curve figure, the
docs/benchmarks.md section). Never changes how llmos trains: the llmos job runs `llmos.train.trainer.train` itself
(what `llmos train` runs) and reads its step times and losses from the run's metrics.jsonl; the peers are fed the
very windows the trainer's `BatchSampler` draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llmos.errors import InvalidRequestError

SYSTEMS = ("llmos", "llmos+compile", "hf-trainer", "torch-loop")  # the default run
QUICK_SYSTEMS = ("llmos", "hf-trainer", "torch-loop")  # --quick: no compilation (tens of seconds)
PEER = "hf-trainer"  # the ratio's denominator
LEVERS = ("fused-ce", "fused-adamw", "malloc", "onednn", "compile")  # llmos.train.fast's helpers, one by one
DEFAULT_LEVERS = ("fused-ce", "fused-adamw", "malloc", "onednn")  # "llmos" = llmos-base + all four


@dataclass(frozen=True)
class TrainShape:
    """A Llama-family shape; the vocabulary is the bundled tokenizer's (8192), embeddings tied."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


SHAPES = {
    "default": TrainShape(256, 4, 8, 4, 768),  # the bundled default model's shape (5.2M parameters)
    "tiny": TrainShape(32, 2, 4, 2, 64),  # --quick and the tests
}


@dataclass
class TrainBenchConfig:
    """One benchmark run. `steps` optimizer steps per system and round; the first `warmup_steps` are not timed."""

    shape: str = "default"
    steps: int = 20
    warmup_steps: int = 4
    batch_size: int = 16
    seq_len: int = 256
    rounds: int = 3  # each round runs every system once, in a rotated order; tokens/s is the median over rounds
    systems: tuple[str, ...] = SYSTEMS
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay from lr to min_lr over the run, no warmup (see lr_at)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2  # torch intra-op threads per system; 0 = every core
    out: Path = Path("benchmarks/results-train")
    img_dir: Path | None = None  # where training-loss.png goes (default: out)
    quick: bool = False
    timeout_s: float = 1800.0  # per job
    command: str = ""  # the command line, for the report

    @classmethod
    def quick_config(cls, **kw) -> "TrainBenchConfig":
        base = dict(shape="tiny", steps=4, warmup_steps=1, batch_size=2, seq_len=32, rounds=1, quick=True,
                    systems=QUICK_SYSTEMS)
        return cls(**{**base, **kw})

    def validate(self) -> None:
        if self.shape not in SHAPES:
            raise InvalidRequestError(f"training shape {self.shape!r} is not one of {', '.join(SHAPES)}.")
        for name in ("steps", "batch_size", "seq_len", "rounds"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not 1 <= self.warmup_steps < self.steps:
            raise InvalidRequestError(f"need 1 <= warmup steps ({self.warmup_steps}) < --steps ({self.steps}): "
                                      "at least one step must be timed.")
        if self.threads < 0:
            raise InvalidRequestError(f"--threads must be >= 0, got {self.threads}.")
        for s in self.systems:
            parse_system(s)
        if not self.systems:
            raise InvalidRequestError("--systems is empty; name at least one of " + ", ".join(SYSTEMS) + ".")


def parse_system(name: str) -> tuple[str, tuple[str, ...]]:
    """'llmos' -> ('llmos', DEFAULT_LEVERS); 'llmos-base+fused-ce' -> ('llmos', ('fused-ce',)); peers -> (name, ()).

    `llmos-base` is the trainer's loop with no lever (F.cross_entropy on full logits, the default for-loop AdamW,
    MKL matmuls); each `+lever` adds one of `LEVERS`. Raises `InvalidRequestError` for an unknown name."""
    if name in ("hf-trainer", "torch-loop"):
        return name, ()
    if name == "hf-trainer+compile":  # the Trainer's own torch_compile=True
        return "hf-trainer", ("compile",)
    head, *levers = name.split("+")
    if head not in ("llmos", "llmos-base") or any(lv not in LEVERS for lv in levers):
        raise InvalidRequestError(f"unknown system {name!r}: use llmos, hf-trainer, hf-trainer+compile, torch-loop, or "
                                  f"llmos-base / llmos with +lever suffixes from {', '.join(LEVERS)} (e.g. "
                                  "llmos-base+fused-ce).")
    base = () if head == "llmos-base" else DEFAULT_LEVERS
    return "llmos", tuple(dict.fromkeys(base + tuple(levers)))


def lr_at(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Cosine decay from `lr` at step 0 to `min_lr` (0-based `step` of `total_steps`), no warmup. This is what
    llmos's `get_lr` computes with `warmup_steps=0` and what transformers' `cosine_with_min_lr` schedule computes
    with no warmup (transformers' warmup starts at 0, llmos's one step later, so a warmup would differ by a step)."""
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps)))) * (lr - min_lr)


# ---- the workload -----------------------------------------------------------------------------------------------


DATA_SOURCE = "src/llmos/assets/default-model/heldout.txt"


def data_file() -> Path:
    """The benchmark's text: the bundled default model's held-out text."""
    from llmos.bench.checkpoints import default_model_dir

    return default_model_dir() / "heldout.txt"


def trainer_config(spec: dict, out_dir: Path, compile: bool = False):
    """The llmos `TrainConfig` of a benchmark run: what `llmos train --init-from INIT --data TEXT ...` gets. One
    micro-batch per step, fp32 on the CPU, no warmup (see `lr_at`), a metrics row every step, no checkpoint before
    the end, one validation pass (one batch) after the last step, so that no timed step evaluates or saves."""
    from llmos.train.trainer import TrainConfig

    steps = spec["steps"]
    return TrainConfig(data=[str(data_file())], init_from=spec["model_dir"], out_dir=str(out_dir), arch="llama",
                       batch_size=spec["batch_size"], seq_len=spec["seq_len"], max_steps=steps, lr=spec["lr"],
                       min_lr=spec["min_lr"], warmup_steps=0, weight_decay=spec["weight_decay"], beta1=spec["beta1"],
                       beta2=spec["beta2"], grad_clip=spec["grad_clip"], grad_accum=1, dtype="float32", device="cpu",
                       num_threads=spec["threads"], seed=spec["seed"], log_interval=1, eval_interval=steps + 1,
                       eval_steps=1, save_interval=0, compile=compile, progress=False)


def trainer_windows(data_dir: Path, tok_dir: Path, spec: dict) -> np.ndarray:
    """`[steps, batch, seq_len + 1]` int64: the windows llmos's trainer trains on at steps 0..steps-1 (its
    `BatchSampler` over the prepared training split, seed `spec["seed"]`, the training stream, micro-step 0, one
    process). Inputs are `[..., :-1]`, targets `[..., 1:]` (plain text: every target counts)."""
    from llmos.train.loader import BatchSampler
    from llmos.train.trainer import open_data

    data = open_data(data_dir, tok_dir)
    sampler = BatchSampler(data.train, spec["batch_size"], spec["seq_len"], spec["seed"])
    out = []
    for step in range(spec["steps"]):
        batch = sampler.batch(step, 0)
        if batch.num_targets != batch.targets.numel():
            raise RuntimeError("the benchmark's text has masked targets; it needs plain text")
        out.append(_windows(batch.inputs.numpy(), batch.targets.numpy()))
    return np.stack(out).astype(np.int64)


def _windows(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`[rows, T]` inputs and their `[rows, T]` next-token targets -> `[rows, T + 1]` windows."""
    if not (inputs[:, 1:] == targets[:, :-1]).all():
        raise RuntimeError("targets are not the inputs shifted by one token")
    return np.concatenate([inputs, targets[:, -1:]], axis=1)


def prepare_batches(c: "TrainBenchConfig", init_dir: Path, work: Path) -> tuple[np.ndarray, dict]:
    """Prepare the benchmark's text as `llmos train` does (`prepare_data` with the initial checkpoint's tokenizer,
    into `work/prep`) and return the windows its trainer will draw (`trainer_windows`) and facts for the report."""
    from llmos.train.trainer import open_data, prepare_data

    spec = _spec(c, "llmos", init_dir, work / "batches.npy")
    prep = work / "prep"
    prepare_data(trainer_config(spec, prep), prep, lambda *a, **k: None)
    data_dir, tok_dir = prep / "data", prep / "checkpoints" / "tokenizer"
    data = open_data(data_dir, tok_dir)
    if len(data.train) <= c.seq_len + 1:
        raise InvalidRequestError(f"--seq-len {c.seq_len} needs more than {len(data.train)} tokens of text.")
    facts = {"vocab_size": data.vocab_size, "stream_tokens": len(data.train),
             "val_tokens": 0 if data.val is None else len(data.val)}
    return trainer_windows(data_dir, tok_dir, spec), facts


def write_initial_checkpoint(path: Path, shape: TrainShape, vocab_size: int, seq_len: int, seed: int) -> int:
    """A transformers `LlamaForCausalLM` with its own random init (`torch.manual_seed(seed)`, normal(0, 0.02)),
    saved as a Hugging Face checkpoint (with the bundled tokenizer) that every system loads. Returns the number of
    parameters."""
    import torch
    import transformers as T

    config = T.LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(config).to(torch.float32)
    T.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    from llmos.bench.checkpoints import default_model_dir
    from llmos.train.checkpoint import TOKENIZER_FILES

    for name in TOKENIZER_FILES:  # its tokenizer: the bundled model's (what --init-from needs)
        if (default_model_dir() / name).is_file():
            shutil.copy2(default_model_dir() / name, path / name)
    return sum(p.numel() for p in model.parameters())


# ---- the jobs (each in its own process) -------------------------------------------------------------------------


def run_llmos(spec: dict, batches, levers: tuple[str, ...], run_dir: Path) -> dict:
    """`llmos train` itself: `llmos.train.trainer.train(trainer_config(...))` from the initial checkpoint on the
    benchmark's text, in `run_dir`, after `llmos.train.fast.tune_allocator()` as the CLI calls it (the `malloc`
    lever). Its losses, learning rates and step times come from the run's metrics.jsonl: a step's time is the
    difference of consecutive rows' elapsed seconds (recomputed as tokens / tokens_per_s, which the row holds to
    0.1 token/s, where elapsed_s is rounded to 10 ms). CPU time per step: `time.process_time()` when the trainer
    rewrites progress.json after each step's row (a wrapper around its `atomic_write` that only records).

    `llmos-base` and lever subsets switch the trainer's own choices off where it makes them: no fused loss
    (`fused_loss_module` -> None: `F.cross_entropy` on the full logits), torch's default AdamW
    (`make_optimizer(fused=False)`) and no oneDNN matmuls (`F.linear`, MKL's sgemm). Checks that the run trained on `batches` (the windows the peers get)."""
    from llmos.train import trainer

    if "malloc" in levers:
        from llmos.train import fast

        fast.tune_allocator()
    if "fused-ce" not in levers:
        trainer.fused_loss_module = lambda *args, **kwargs: None
    if "onednn" not in levers:  # F.linear (MKL sgemm) for every matmul, as LLMOS_ONEDNN=0 makes it
        from llmos.model import native

        native.onednn_linear_available = lambda: False
    if "fused-adamw" not in levers:
        make_optimizer = trainer.make_optimizer
        trainer.make_optimizer = lambda model, c, fused=False: make_optimizer(model, c, fused=False)
    cpu_marks: dict[int, tuple[float, float]] = {}
    atomic_write = trainer.atomic_write

    def recording_write(path, text):
        if Path(path).name == "progress.json":
            mark = _now()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                step = json.loads(text)["step"]
                cpu_marks.setdefault(step, mark)
        return atomic_write(path, text)

    trainer.atomic_write = recording_write
    c = trainer_config(spec, run_dir, compile="compile" in levers)
    t_call = _now()
    summary = trainer.train(c)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "train_loss" in r]
    if [r["step"] for r in rows] != list(range(1, spec["steps"] + 1)):
        raise RuntimeError(f"metrics.jsonl holds train rows for steps {[r['step'] for r in rows]}, "
                           f"not 1..{spec['steps']}")
    walls = [0.0] + [r["elapsed_s"] for r in rows]
    precise = [0.0] + [r["tokens"] / r["tokens_per_s"] if r.get("tokens_per_s") else -1.0 for r in rows]
    if all(abs(a - b) <= 0.0051 for a, b in zip(walls, precise)):  # the rate is the run's tokens / elapsed
        walls = precise
    cpus = [cpu_marks[k][1] if k in cpu_marks else None for k in range(spec["steps"] + 1)]
    drawn = trainer_windows(run_dir / "data", run_dir / "checkpoints" / "tokenizer", spec)
    if drawn.shape != tuple(batches.shape) or not (drawn == batches.numpy()).all():
        raise RuntimeError("llmos's trainer drew other windows than the peers were given")
    first = cpu_marks[1][0] - t_call[0] if 1 in cpu_marks else walls[1]
    for weights in [run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best", *run_dir.glob("*.safetensors")]:
        shutil.rmtree(weights) if weights.is_dir() else weights.unlink(missing_ok=True)  # ~100 MB a run, unused
    fused = "fused-ce" in levers
    return {"losses": [r["train_loss"] for r in rows], "lrs": [r["lr"] for r in rows], "walls": walls,
            "cpus": cpus, "first_step_s": first, "val_loss": summary.get("val_loss"),
            "notes": f"llmos.train.trainer.train (llmos train: init_from, log_interval 1, evaluation after the last "
                     f"step) + levers {', '.join(levers) or 'none'}; AdamW "
                     f"{'fused' if 'fused-adamw' in levers else 'for-loop (torch default)'}; loss "
                     f"{'fused LM head + chunked cross-entropy' if fused else 'F.cross_entropy on full logits'}; "
                     "its peak RSS includes the run's end (a validation batch on full logits, the checkpoints)"}


def run_torch_loop(spec: dict, batches) -> dict:
    """The plain PyTorch loop a researcher writes on the transformers model: AdamW (torch's default
    implementation), the model's own loss, clipping, the same schedule."""
    import torch
    import transformers as T

    model = T.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model.train()
    params = list(model.parameters())  # tied weights once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": spec["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=spec["lr"], betas=(spec["beta1"], spec["beta2"]), eps=1e-8)
    losses, lrs, ends = [], [], []
    for step in range(spec["steps"]):
        lr = lr_at(step, spec["steps"], spec["lr"], spec["min_lr"])
        for g in optimizer.param_groups:
            g["lr"] = lr
        b = batches[step]
        targets = b[:, 1:].contiguous()
        loss = model(input_ids=b[:, :-1], labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        lrs.append(lr)
        ends.append(_now())
    return {"losses": losses, "lrs": lrs, "ends": ends,
            "notes": "transformers LlamaForCausalLM (sdpa), torch.optim.AdamW defaults (for-loop on CPU), "
                     "model(input_ids, labels, shift_labels).loss"}


def run_hf_trainer(spec: dict, batches, compile: bool = False) -> dict:
    """transformers `Trainer` with its defaults where the benchmark does not fix a setting: its default optimizer
    (`adamw_torch_fused`), `cosine_with_min_lr` schedule without warmup, no evaluation, no saving, logging every
    step, `use_cpu=True`. The batches come from an `IterableDataset` in the benchmark's order."""
    import tempfile

    import torch
    import transformers as T

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in batches:
                for row in b:
                    targets = row[1:]
                    yield {"input_ids": row[:-1], "labels": targets, "shift_labels": targets}

    class Record(T.TrainerCallback):
        def __init__(self) -> None:
            self.ends, self.logs = [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(_now())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    model = T.LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    record = Record()
    with tempfile.TemporaryDirectory(prefix="llmos-bench-trainer-") as tmp:
        args = T.TrainingArguments(
            output_dir=tmp, max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
            gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
            adam_beta1=spec["beta1"], adam_beta2=spec["beta2"], adam_epsilon=1e-8, max_grad_norm=spec["grad_clip"],
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": spec["min_lr"]}, warmup_steps=0,
            logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            # keep shift_labels: the model's loss takes it, but it is not in forward's signature
            remove_unused_columns=False, torch_compile=compile,
            seed=spec["seed"])
        trainer = T.Trainer(model=model, args=args, train_dataset=Rows(), data_collator=T.default_data_collator,
                            callbacks=[record])
        trainer.train()
    optim = trainer.args.optim
    logs = sorted(record.logs, key=lambda r: r["step"])
    return {"losses": [r["loss"] for r in logs], "lrs": [r["learning_rate"] for r in logs], "ends": record.ends,
            "notes": f"transformers Trainer, optim={getattr(optim, 'value', optim)}, lr_scheduler=cosine_with_min_lr, "
                     f"logging_steps=1, no eval/saving, use_cpu=True, torch_compile={compile}"}


def run_job(spec: dict) -> dict:
    """Run one system's training (in this process) and return its losses, learning rates, step times, tokens/s
    and peak RSS. `spec` is the JSON the parent writes (see `_spec`)."""
    import torch

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    torch.manual_seed(spec["seed"])
    batches = torch.from_numpy(np.load(spec["batches"], allow_pickle=False))
    kind, levers = parse_system(spec["system"])
    t0 = _now()
    if kind == "llmos":
        raw = run_llmos(spec, batches, levers, Path(spec["run_dir"]))
    else:
        raw = run_torch_loop(spec, batches) if kind == "torch-loop" else run_hf_trainer(spec, batches,
                                                                                         "compile" in levers)
        marks = [t0, *raw.pop("ends")]
        raw.update(walls=[m[0] - t0[0] for m in marks], cpus=[m[1] for m in marks],
                   first_step_s=marks[1][0] - t0[0] if len(marks) > 1 else None)
    walls, cpus, w = raw.pop("walls"), raw.pop("cpus"), spec["warmup_steps"]
    if len(walls) != spec["steps"] + 1 or len(raw["losses"]) != spec["steps"]:
        raise RuntimeError(f"{spec['system']}: recorded {len(walls) - 1} step times and {len(raw['losses'])} losses "
                           f"for {spec['steps']} steps")
    step_s = [b - a for a, b in zip(walls[:-1], walls[1:])][w:]  # the timed steps' durations
    cpu_s = None
    if all(x is not None for x in cpus[w:]):  # and the CPU time they used (all threads)
        cpu_s = [b - a for a, b in zip(cpus[w:-1], cpus[w + 1:])]
    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    return {**raw, "step_end_s": walls[1:], "timed_steps": len(step_s), "timed_s": sum(step_s),
            "step_s": step_s, "median_step_s": statistics.median(step_s), "step_cpu_s": cpu_s,
            "median_step_cpu_s": statistics.median(cpu_s) if cpu_s else None,
            "tokens_per_s": tokens_per_step / statistics.median(step_s),
            "wall_tokens_per_s": tokens_per_step * len(step_s) / sum(step_s), "job_s": time.perf_counter() - t0[0],
            "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time over all threads), seconds."""
    return time.perf_counter(), time.process_time()


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec(c: TrainBenchConfig, system: str, model_dir: Path, batches: Path, run_dir: Path | None = None) -> dict:
    keys = ("steps", "warmup_steps", "batch_size", "seq_len", "lr", "min_lr", "weight_decay", "beta1", "beta2",
            "grad_clip", "seed", "threads")
    return {"system": system, "model_dir": str(model_dir), "batches": str(batches),
            "run_dir": str(run_dir) if run_dir else None, **{k: getattr(c, k) for k in keys}}


def _launch(spec: dict, work: Path, tag: str, timeout_s: float) -> dict:
    """Run one job in a fresh Python process; its stderr goes to work/logs/<tag>.log."""
    spec_file, out_file, log = work / f"{tag}.spec.json", work / f"{tag}.out.json", work / "logs" / f"{tag}.log"
    spec_file.write_text(json.dumps(spec))
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with log.open("w") as err:
        try:
            proc = subprocess.run([sys.executable, "-m", "llmos.bench.training_bench", str(spec_file), str(out_file)],
                                  stdout=err, stderr=err, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s (log: {log})"}
    if proc.returncode != 0 or not out_file.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit status {proc.returncode}: {' / '.join(tail)} (log: {log})"}
    return json.loads(out_file.read_text())


# ---- the run ----------------------------------------------------------------------------------------------------


def run_training_benchmark(c: TrainBenchConfig, console=None) -> dict:
    """Prepare the workload, run every system `rounds` times (rotating the order each round), summarize, print
    the table and write `training.json`, `training-section.md` and `training-loss.png` (with matplotlib)."""
    from rich.console import Console

    console = console or Console()
    c.validate()
    c.out.mkdir(parents=True, exist_ok=True)
    work = c.out / "train-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = SHAPES[c.shape]
    from tokenizers import Tokenizer

    from llmos.bench.checkpoints import default_model_dir

    vocab = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json")).get_vocab_size()
    with console.status("building the initial checkpoint and preparing the data"):
        params = write_initial_checkpoint(work / "init", shape, vocab, c.seq_len, c.seed)
        batches, facts = prepare_batches(c, work / "init", work)
    np.save(work / "batches.npy", batches)
    runs: dict[str, list[dict]] = {s: [] for s in c.systems}
    for r in range(c.rounds):
        k = r % len(c.systems)
        for system in c.systems[k:] + c.systems[:k]:
            with console.status(f"round {r + 1}/{c.rounds}: {system}, {c.steps} steps"):
                tag = f"{system}-r{r + 1}"
                res = _launch(_spec(c, system, work / "init", work / "batches.npy", work / "runs" / tag), work, tag,
                              c.timeout_s)
            runs[system].append(res)
            console.print(f"round {r + 1} {system}: " + (res["error"] if "error" in res else
                                                         f"{res['tokens_per_s']:,.0f} tokens/s, final loss "
                                                         f"{res['losses'][-1]:.4f}"))
    results = {"config": {**asdict(c), "out": str(c.out), "img_dir": str(c.img_dir) if c.img_dir else None},
               "shape": asdict(shape), "vocab_size": vocab, "parameters": params, "data": DATA_SOURCE,
               "stream_tokens": facts["stream_tokens"], "val_tokens": facts["val_tokens"],
               "tokens_per_step": c.batch_size * c.seq_len,
               "machine": machine_info(c.threads), "runs": runs}
    results["summary"] = summarize(results)
    img_dir = c.img_dir or c.out
    img_dir.mkdir(parents=True, exist_ok=True)
    png = img_dir / ("training-loss.png" if not c.quick else "training-loss-quick.png")
    results["figure"] = str(png) if plot_losses(results, png) else None
    (c.out / "training.json").write_text(json.dumps(results, indent=1))
    (c.out / "training-section.md").write_text(training_section(results))
    _print(results, console)
    return results


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": threads or os.cpu_count(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_avg_at_end": os.getloadavg()}


def summarize(results: dict) -> dict:
    """Per system: median tokens/s over rounds (and the spread), the median of the per-round ratios to the peer
    (each round's llmos / Trainer), losses at step 1 and at the end, the largest loss difference from the peer's
    curve, peak RSS."""
    runs = results["runs"]
    ok = {s: [r for r in rs if "error" not in r] for s, rs in runs.items()}
    out: dict = {"systems": {}}
    for s, rs in ok.items():
        if not rs:
            out["systems"][s] = {"error": runs[s][0]["error"] if runs[s] else "no runs"}
            continue
        tps = [r["tokens_per_s"] for r in rs]
        first = rs[0]
        row = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps, "min": min(tps), "max": max(tps),
               "wall_tokens_per_s": statistics.median(r["wall_tokens_per_s"] for r in rs),
               "step_ms": 1e3 * statistics.median(r["median_step_s"] for r in rs),
               "step_cpu_ms": (1e3 * statistics.median(r["median_step_cpu_s"] for r in rs)
                               if all(r["median_step_cpu_s"] for r in rs) else None),
               "best_step_ms": 1e3 * min(min(r["step_s"]) for r in rs),
               "loss_step1": first["losses"][0], "final_loss": first["losses"][-1],
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "notes": first.get("notes", ""),
               "first_step_s": statistics.median(r["first_step_s"] for r in rs),
               "errors": len(runs[s]) - len(rs)}
        if PEER in ok and ok[PEER] and s != PEER:
            peer = ok[PEER][0]
            row["max_loss_diff_vs_peer"] = max(abs(a - b) for a, b in zip(first["losses"], peer["losses"]))
            per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[s], runs[PEER])
                         if "error" not in a and "error" not in b]
            if per_round:
                row["vs_peer_rounds"] = per_round
                row["vs_peer"] = statistics.median(per_round)
                cpu = [b["median_step_cpu_s"] / a["median_step_cpu_s"] for a, b in zip(runs[s], runs[PEER])
                       if "error" not in a and "error" not in b and a["median_step_cpu_s"] and b["median_step_cpu_s"]]
                row["vs_peer_cpu"] = statistics.median(cpu) if cpu else None
        out["systems"][s] = row
    if "llmos" in out["systems"] and "vs_peer" in out["systems"]["llmos"]:
        out["llmos_vs_peer"] = out["systems"]["llmos"]["vs_peer"]
    out["vs_peer"] = {s: row["vs_peer"] for s, row in out["systems"].items() if "vs_peer" in row}
    return out


def plot_losses(results: dict, png: Path) -> bool:
    """Every system's per-step training loss (round 1) on one figure, and each one's difference from the
    Trainer's curve. Returns False when matplotlib is not installed (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = {s: next((r for r in rs if "error" not in r), None) for s, rs in results["runs"].items()}
    runs = {s: r for s, r in runs.items() if r}
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    for i, (s, r) in enumerate(runs.items()):
        steps = range(1, len(r["losses"]) + 1)
        ax.plot(steps, r["losses"], linestyle=styles[i % len(styles)], linewidth=1.4, label=s)
        if PEER in runs and s != PEER:
            dx.plot(steps, [a - b for a, b in zip(r["losses"], runs[PEER]["losses"])],
                    linestyle=styles[i % len(styles)], label=f"{s} - {PEER}")
    c = results["config"]
    ax.set_title(f"training loss, {results['parameters'] / 1e6:.1f}M-parameter Llama, batch {c['batch_size']} x "
                 f"{c['seq_len']} tokens", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    dx.set_title(f"difference from {PEER}'s loss (same weights, same batches)", fontsize=9)
    dx.set_xlabel("step")
    dx.set_ylabel("nats/token")
    dx.grid(alpha=0.3)
    if dx.lines:
        dx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def training_section(r: dict) -> str:
    """The markdown for docs/benchmarks.md: machine, command, workload, the table, the ratio, the figure."""
    c, m, s = r["config"], r["machine"], r["summary"]
    sh = r["shape"]
    lines = []
    if c["quick"]:
        lines += ["A --quick smoke run on a tiny shape: the numbers show the benchmark works, they are not "
                  "measurements.", ""]
    lines += [
        f"Machine: {m['platform']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, {m['threads']} threads per system. Date: {m['date']}. "
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in m['load_avg_at_end'])}.", "",
        "```", c["command"] or "llmos bench --suite train", "```", "",
        f"Workload: a Llama of {r['parameters'] / 1e6:.2f}M parameters (hidden {sh['hidden_size']}, "
        f"{sh['num_layers']} layers, {sh['num_heads']} heads / {sh['num_kv_heads']} KV heads, intermediate "
        f"{sh['intermediate_size']}, vocabulary {r['vocab_size']}, tied embeddings), fp32, from one initial "
        f"checkpoint (transformers' init, seed {c['seed']}) that every system loads; batch {c['batch_size']} x "
        f"{c['seq_len']} tokens ({r['tokens_per_step']:,} tokens/step): the windows llmos's trainer draws (its "
        f"`BatchSampler`, seed {c['seed']}) from `{r['data']}` as `llmos train` prepares it (the bundled tokenizer; "
        f"a {r['stream_tokens']:,}-token training split), fed to the peers in the same order; AdamW "
        f"(lr {c['lr']}, betas ({c['beta1']}, {c['beta2']}), eps 1e-8, weight decay {c['weight_decay']} on matrices "
        f"and embeddings, none on norms), cosine decay to {c['min_lr']} over {c['steps']} steps without warmup, "
        f"gradient clipping at {c['grad_clip']}. llmos is `llmos.train.trainer.train` itself (`llmos train "
        "--init-from`, a metrics row every step, one validation pass after the last step, no checkpoint before the "
        "end); its times and losses are read from its metrics.jsonl. "
        f"Each system runs alone in a fresh process, {c['rounds']} round(s), "
        f"the order rotated each round. A step's time runs from the end of the previous step to the end of this one "
        "(everything the system does per step: data, forward, backward, clipping, optimizer, logging); the first "
        f"{c['warmup_steps']} steps are warm-up (allocator, optimizer state, first calls; compilation) and not "
        f"counted. Tokens/s = tokens per step / the median time of steps {c['warmup_steps'] + 1}-{c['steps']} (robust "
        "to other processes' bursts on a shared machine), median over rounds; wall tokens/s = the same steps' "
        "tokens / their total time; CPU ms/step = the median step's CPU time over all the process's threads (less "
        "sensitive to other processes than wall time); best ms/step = the fastest timed step of any round.", "",
        f"| system | tokens/s | rounds (min-max) | wall tokens/s | ms/step | best ms/step | CPU ms/step | vs {PEER} | "
        f"loss at step 1 | final loss | max loss diff vs {PEER} | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in s["systems"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error']} | | | | | | | | | | |")
            continue
        vs = f"{row['vs_peer']:.2f}x" if "vs_peer" in row else ("1.00x" if name == PEER else "")
        diff = f"{row['max_loss_diff_vs_peer']:.1e}" if "max_loss_diff_vs_peer" in row else ""
        lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {row['min']:,.0f}-{row['max']:,.0f} | "
                     f"{row['wall_tokens_per_s']:,.0f} | {row['step_ms']:.0f} | {row['best_step_ms']:.0f} | "
                     f"{_fmt(row['step_cpu_ms'], '.0f')} | {vs} | {row['loss_step1']:.5f} | {row['final_loss']:.4f} | "
                     f"{diff} | "
                     f"{row['peak_rss_mib']:.0f} |")
    lines.append("")
    for name, row in s["systems"].items():
        if name.startswith("llmos") and "vs_peer" in row:
            lines += [f"**{name} / {PEER} = {row['vs_peer']:.2f}x** in tokens/s (median of the per-round ratios "
                      f"{', '.join(f'{x:.2f}' for x in row['vs_peer_rounds'])}; target >= 1.2x); by CPU time per "
                      f"step {_fmt(row['vs_peer_cpu'], '.2f')}x.", ""]
    lines += [f"- {name}: {row.get('notes', '')}; load + step 1 took {row['first_step_s']:.1f} s"
              for name, row in s["systems"].items() if "error" not in row]
    if r.get("figure"):
        lines += ["", f"![training loss]({Path(r['figure']).name})"]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _print(r: dict, console) -> None:
    from rich.table import Table

    table = Table(title="training: llmos against transformers (tokens/s, median over rounds)")
    rows = [ln for ln in training_section(r).splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    header, *body = rows
    for col in header.strip("|").split("|"):
        table.add_column(col.strip())
    for line in body:
        table.add_row(*[x.strip() for x in line.strip("|").split("|")])
    console.print(table)
    for name, ratio in r["summary"].get("vs_peer", {}).items():
        console.print(f"{name} / {PEER}: {ratio:.2f}x")


def main(argv: list[str] | None = None) -> None:
    """`python -m llmos.bench.training_bench SPEC OUT`: run one job, write its result JSON."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run_job(spec)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(argv[1])


if __name__ == "__main__":
    main()
