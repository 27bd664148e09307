"""The training benchmark (issue 5): llmos's trainer against transformers' `Trainer` and a plain PyTorch loop,
side by side in one run: the same Llama shape, initial weights, batches (in the same order), optimizer, schedule,
clipping, fp32 and thread count.

Owns the workload (shape, token stream, batches, the initial checkpoint), the timed jobs (each system alone in
a fresh process: `python -m llmos.bench.training_bench SPEC OUT`), and the report (table, loss-curve figure, the
docs/benchmarks.md section). Never changes how llmos trains: the llmos job calls the trainer's own pieces
through one adapter, `llmos_train_step`, plus the `llmos.train.fast` helpers the trainer's loop uses.
"""

from __future__ import annotations

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
LEVERS = ("fused-ce", "fused-adamw", "malloc", "compile")  # llmos.train.fast's helpers, one by one
DEFAULT_LEVERS = ("fused-ce", "fused-adamw", "malloc")  # "llmos" = llmos-base+fused-ce+fused-adamw+malloc


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

    `llmos-base` is the trainer's loop with no lever (F.cross_entropy on full logits, the default for-loop AdamW);
    each `+lever` adds one of `LEVERS`. Raises `InvalidRequestError` for an unknown name."""
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


def token_stream() -> tuple[np.ndarray, int, str]:
    """The bundled default model's held-out text encoded with its tokenizer, documents separated by
    `<|endoftext|>` as `llmos.train.data` packs them: `[num_tokens]` int64, the vocabulary size, the source."""
    from tokenizers import Tokenizer

    from llmos.bench.checkpoints import default_model_dir

    d = default_model_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    text = (d / "heldout.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False).ids
    source = "src/llmos/assets/default-model/heldout.txt"
    return np.array([eot, *ids, eot], dtype=np.int64), tok.get_vocab_size(), source


def make_batches(stream: np.ndarray, steps: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """`[steps, batch, seq_len + 1]` int64 windows at uniformly random offsets (`np.random.default_rng(seed)`), as
    `llmos.train.data.get_batch` draws them. Inputs are `[..., :-1]`, targets `[..., 1:]`."""
    if len(stream) <= seq_len + 1:
        raise InvalidRequestError(f"--seq-len {seq_len} needs more than {len(stream)} tokens of text.")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq_len, size=(steps, batch_size))
    return np.stack([[stream[s:s + seq_len + 1] for s in row] for row in starts]).astype(np.int64)


def write_initial_checkpoint(path: Path, shape: TrainShape, vocab_size: int, seq_len: int, seed: int) -> int:
    """A transformers `LlamaForCausalLM` with its own random init (`torch.manual_seed(seed)`, normal(0, 0.02)),
    saved as a Hugging Face checkpoint that every system loads. Returns the number of parameters."""
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
    return sum(p.numel() for p in model.parameters())


# ---- the jobs (each in its own process) -------------------------------------------------------------------------


def _train_config(spec: dict):
    """The llmos `TrainConfig` of the benchmark's settings (one micro-batch per step, fp32, no warmup)."""
    from llmos.train.trainer import TrainConfig

    return TrainConfig(batch_size=spec["batch_size"], seq_len=spec["seq_len"], max_steps=spec["steps"],
                       lr=spec["lr"], min_lr=spec["min_lr"], warmup_steps=0, weight_decay=spec["weight_decay"],
                       beta1=spec["beta1"], beta2=spec["beta2"], grad_clip=spec["grad_clip"], grad_accum=1,
                       dtype="float32", num_threads=spec["threads"], progress=False)


def llmos_setup(model_dir: str, spec: dict, levers: tuple[str, ...]):
    """llmos's model and optimizer for the run, built by the trainer's own functions (`make_optimizer`'s parameter
    groups; fused AdamW from `llmos.train.fast` with the lever). Returns (model, optimizer, TrainConfig)."""
    from llmos.model.loader import load_model
    from llmos.train import fast
    from llmos.train.trainer import make_optimizer

    c = _train_config(spec)
    if "malloc" in levers:
        fast.tune_allocator()
    model, _ = load_model(model_dir)
    model.train()
    optimizer = make_optimizer(model, c)
    if "fused-adamw" in levers:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = fast.make_fused_adamw(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)
    if "compile" in levers:
        model = fast.compile_model(model)
    return model, optimizer, c


def llmos_train_step(model, optimizer, batch, step: int, c, levers: tuple[str, ...]) -> float:
    """THE ADAPTER: one optimizer step of `llmos.train.trainer`'s loop (one micro-batch, fp32), on `batch`
    `[B, T + 1]`; returns the step's loss. Mirrors the loop line for line (learning rate from its `get_lr`, loss,
    backward, clipping, step, zero_grad), with the `fused-ce` lever's loss `llmos.train.fast.causal_lm_loss` in
    place of `F.cross_entropy` on the full logits. When the trainer's loop changes, change this function only."""
    import torch
    import torch.nn.functional as F

    from llmos.train import fast
    from llmos.train.trainer import get_lr

    lr = get_lr(step, c)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if "fused-ce" in levers:
        loss = fast.causal_lm_loss(model, batch[:, :-1], batch[:, 1:])
    else:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    if c.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_llmos(spec: dict, batches, levers: tuple[str, ...]) -> dict:
    from llmos.train.trainer import get_lr

    model, optimizer, c = llmos_setup(spec["model_dir"], spec, levers)
    losses, lrs, ends = [], [], []
    for step in range(spec["steps"]):
        lrs.append(get_lr(step, c))
        losses.append(llmos_train_step(model, optimizer, batches[step], step, c, levers))
        ends.append(_now())
    opt = optimizer.defaults
    impl = "fused" if opt.get("fused") else "foreach" if opt.get("foreach") else "for-loop (torch's CPU default)"
    loss = "fused LM head + chunked cross-entropy" if "fused-ce" in levers else "F.cross_entropy on full logits"
    return {"losses": losses, "lrs": lrs, "step_end_s": ends,
            "notes": f"llmos.train.trainer (make_optimizer, get_lr, the loop's step) + levers "
                     f"{', '.join(levers) or 'none'}; AdamW {impl}; loss "
                     f"{loss}"}


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
    return {"losses": losses, "lrs": lrs, "step_end_s": ends,
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
    return {"losses": [r["loss"] for r in logs], "lrs": [r["learning_rate"] for r in logs], "step_end_s": record.ends,
            "notes": f"transformers Trainer, optim={getattr(optim, 'value', optim)}, lr_scheduler=cosine_with_min_lr, "
                     f"logging_steps=1, no eval/saving, use_cpu=True, torch_compile={compile}"}


def run_job(spec: dict) -> dict:
    """Run one system's training (in this process) and return its losses, learning rates, step end times,
    tokens/s and peak RSS. `spec` is the JSON the parent writes (see `_spec`)."""
    import torch

    torch.set_num_threads(spec["threads"] or os.cpu_count() or 1)
    torch.manual_seed(spec["seed"])
    batches = torch.from_numpy(np.load(spec["batches"], allow_pickle=False))
    kind, levers = parse_system(spec["system"])
    t0 = _now()
    if kind == "llmos":
        raw = run_llmos(spec, batches, levers)
    elif kind == "torch-loop":
        raw = run_torch_loop(spec, batches)
    else:
        raw = run_hf_trainer(spec, batches, compile="compile" in levers)
    ends, w = raw["step_end_s"], spec["warmup_steps"]
    if len(ends) != spec["steps"] or len(raw["losses"]) != spec["steps"]:
        raise RuntimeError(f"{spec['system']}: recorded {len(ends)} step times and {len(raw['losses'])} losses "
                           f"for {spec['steps']} steps")
    marks = [t0, *ends]
    step_s = [b[0] - a[0] for a, b in zip(marks[:-1], marks[1:])][w:]  # the timed steps' durations
    cpu_s = [b[1] - a[1] for a, b in zip(marks[:-1], marks[1:])][w:]  # and the CPU time they used (all threads)
    tokens_per_step = spec["batch_size"] * spec["seq_len"]
    return {**raw, "step_end_s": [e[0] - t0[0] for e in ends], "timed_steps": len(step_s), "timed_s": sum(step_s),
            "step_s": step_s, "median_step_s": statistics.median(step_s), "step_cpu_s": cpu_s,
            "median_step_cpu_s": statistics.median(cpu_s),
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


def _spec(c: TrainBenchConfig, system: str, model_dir: Path, batches: Path) -> dict:
    keys = ("steps", "warmup_steps", "batch_size", "seq_len", "lr", "min_lr", "weight_decay", "beta1", "beta2",
            "grad_clip", "seed", "threads")
    return {"system": system, "model_dir": str(model_dir), "batches": str(batches), **{k: getattr(c, k) for k in keys}}


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
    stream, vocab, source = token_stream()
    batches = make_batches(stream, c.steps, c.batch_size, c.seq_len, c.seed)
    np.save(work / "batches.npy", batches)
    with console.status("building the initial checkpoint"):
        params = write_initial_checkpoint(work / "init", shape, vocab, c.seq_len, c.seed)
    runs: dict[str, list[dict]] = {s: [] for s in c.systems}
    for r in range(c.rounds):
        k = r % len(c.systems)
        for system in c.systems[k:] + c.systems[:k]:
            with console.status(f"round {r + 1}/{c.rounds}: {system}, {c.steps} steps"):
                res = _launch(_spec(c, system, work / "init", work / "batches.npy"), work, f"{system}-r{r + 1}",
                              c.timeout_s)
            runs[system].append(res)
            console.print(f"round {r + 1} {system}: " + (res["error"] if "error" in res else
                                                         f"{res['tokens_per_s']:,.0f} tokens/s, final loss "
                                                         f"{res['losses'][-1]:.4f}"))
    results = {"config": {**asdict(c), "out": str(c.out), "img_dir": str(c.img_dir) if c.img_dir else None},
               "shape": asdict(shape), "vocab_size": vocab, "parameters": params, "data": source,
               "stream_tokens": int(len(stream)), "tokens_per_step": c.batch_size * c.seq_len,
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
               "step_cpu_ms": 1e3 * statistics.median(r["median_step_cpu_s"] for r in rs),
               "best_step_ms": 1e3 * min(min(r["step_s"]) for r in rs),
               "loss_step1": first["losses"][0], "final_loss": first["losses"][-1],
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "notes": first.get("notes", ""),
               "first_step_s": statistics.median(r["step_end_s"][0] for r in rs),
               "errors": len(runs[s]) - len(rs)}
        if PEER in ok and ok[PEER] and s != PEER:
            peer = ok[PEER][0]
            row["max_loss_diff_vs_peer"] = max(abs(a - b) for a, b in zip(first["losses"], peer["losses"]))
            per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[s], runs[PEER])
                         if "error" not in a and "error" not in b]
            if per_round:
                row["vs_peer_rounds"] = per_round
                row["vs_peer"] = statistics.median(per_round)
                row["vs_peer_cpu"] = statistics.median(b["median_step_cpu_s"] / a["median_step_cpu_s"]
                                                       for a, b in zip(runs[s], runs[PEER])
                                                       if "error" not in a and "error" not in b)
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
        f"{c['seq_len']} tokens ({r['tokens_per_step']:,} tokens/step) drawn once from `{r['data']}` "
        f"({r['stream_tokens']:,} tokens, the bundled tokenizer) and fed to every system in the same order; AdamW "
        f"(lr {c['lr']}, betas ({c['beta1']}, {c['beta2']}), eps 1e-8, weight decay {c['weight_decay']} on matrices "
        f"and embeddings, none on norms), cosine decay to {c['min_lr']} over {c['steps']} steps without warmup, "
        f"gradient clipping at {c['grad_clip']}. Each system runs alone in a fresh process, {c['rounds']} round(s), "
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
                     f"{row['step_cpu_ms']:.0f} | {vs} | {row['loss_step1']:.5f} | {row['final_loss']:.4f} | {diff} | "
                     f"{row['peak_rss_mib']:.0f} |")
    lines.append("")
    for name, row in s["systems"].items():
        if name.startswith("llmos") and "vs_peer" in row:
            lines += [f"**{name} / {PEER} = {row['vs_peer']:.2f}x** in tokens/s (median of the per-round ratios "
                      f"{', '.join(f'{x:.2f}' for x in row['vs_peer_rounds'])}; target >= 1.2x); by CPU time per "
                      f"step {row['vs_peer_cpu']:.2f}x.", ""]
    lines += [f"- {name}: {row.get('notes', '')}; load + step 1 took {row['first_step_s']:.1f} s"
              for name, row in s["systems"].items() if "error" not in row]
    if r.get("figure"):
        lines += ["", f"![training loss]({Path(r['figure']).name})"]
    return "\n".join(lines) + "\n"


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
