"""The training configuration: one typed record, read from YAML or TOML, overridden from the command line.

Owns `TrainConfig`, its validation and its file formats (config.yaml / config.toml, `--set key=value`).
Never trains, never reads training data and never touches a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from llmos.errors import InvalidRequestError

ARCHS = ("llama", "gpt2", "lstm")
TASKS = ("lm", "sft", "classify")
NORMALIZE = ("none", "nfc", "nfkc")
DISTS = ("ddp", "fsdp")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
FLAGS = {"num_layers": "--layers", "num_heads": "--heads", "num_kv_heads": "--kv-heads", "num_threads": "--threads",
         "out_dir": "--out"}


def flag(name: str) -> str:
    """The command-line flag of a field, for error messages (`num_layers` -> `--layers`)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass
class TrainConfig:
    """Everything one training run needs. `validate()` raises `InvalidRequestError` for bad values.

    Units: lengths and counts in tokens, windows or optimizer steps as named; learning rates per step.
    `batch_size` is the *global* number of windows per micro-step (summed over all ranks under torchrun),
    so a run's batches, and hence its losses, do not depend on how many processes train it.
    """

    data: list[str] = field(default_factory=list)  # files or folders: .txt/.md (and .jsonl/.csv with shards)
    out_dir: str = "out"  # the run directory; holds the final Hugging Face checkpoint at the end
    tokenizer: str | None = None  # reuse the tokenizer in this directory instead of training one
    vocab_size: int = 8192
    arch: str = "llama"  # "llama" | "gpt2" | "lstm" (from scratch); must match init_from's checkpoint
    task: str = "lm"  # "lm" (pretraining / continued pretraining) | "sft" | "classify"
    init_from: str | None = None  # a checkpoint directory to start from (weights and tokenizer)
    # data (see sources.py)
    text_field: str = "text"  # JSONL field with the text
    messages_field: str = "messages"  # JSONL field with chat messages (task sft)
    text_column: str = "text"  # CSV column with the text
    label_column: str = "label"  # CSV column with the label (task classify)
    normalize: str = "none"  # "none" | "nfc" | "nfkc"
    clean: bool = False  # strip control characters, normalise newlines, collapse blank runs
    dedup: bool = True  # drop exact duplicate documents
    shards_dir: str | None = None  # prepared shards to reuse; default <out>/data
    chat_tokens: bool = False  # add <|im_start|>/<|im_end|> and a ChatML template to a new tokenizer
    # model shape (llama: RoPE, RMSNorm, SwiGLU, GQA; gpt2: learned positions, LayerNorm, GELU; lstm: hidden/layers)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    seq_len: int = 256  # tokens per training window; the context of a model trained from scratch
    rope_theta: float = 10000.0
    # optimisation
    batch_size: int = 16  # global windows per micro-step (all ranks together)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000
    max_tokens: int | None = None  # if set, overrides max_steps: ceil(max_tokens / tokens per step)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 = off
    # evaluation, logging, checkpoints
    val_fraction: float = 0.05
    eval_interval: int = 100  # steps between validation passes (and at the last step)
    eval_steps: int = 20  # validation batches per pass
    log_interval: int = 10  # steps between metrics.jsonl lines and progress.json rewrites
    save_interval: int = 0  # steps between resumable checkpoints (0 = only at evaluations and the end)
    resume: bool = False  # continue <out>/checkpoints/last exactly
    # reproducibility and the machine
    seed: int = 1337
    dtype: str = "auto"  # compute dtype: "auto" (bf16 autocast where the GPU supports it, else fp32), float32, bfloat16
    save_dtype: str = "float32"  # dtype of the weights in the final model.safetensors and checkpoints/best
    device: str = "auto"  # "auto" (CUDA if available) | "cpu" | "cuda"
    num_threads: int = 0  # torch intra-op threads per process; 0 = all cores
    compile: bool = False  # torch.compile the model
    progress: bool = True  # show a rich progress bar
    # distributed (see distributed.py)
    dist: str = "ddp"  # "ddp" | "fsdp" (only under torchrun / --nproc)
    nproc: int = 1  # --nproc N: launch torchrun with N local processes
    # LoRA (llmos.train.finetune implements; the trainer calls it)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_merge: bool = True  # merge adapters into the base weights when saving
    # classify (llmos.train.classify implements; the trainer dispatches)
    zero_shot: bool = False  # task classify: score each label's likelihood, no training

    # ---- derived -----------------------------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step, all ranks together: batch_size * grad_accum * seq_len."""
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.tokens_per_step))
        return self.max_steps

    # ---- validation --------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field once, at the edge. Raises `InvalidRequestError` naming the flag and the fix."""
        check_types(self)

        def bad(msg: str) -> None:
            raise InvalidRequestError(msg)

        positive = ("vocab_size", "hidden_size", "num_layers", "seq_len", "batch_size", "grad_accum", "max_steps",
                    "eval_interval", "eval_steps", "log_interval", "nproc")
        if self.arch != "lstm":
            positive += ("num_heads", "num_kv_heads", "intermediate_size")
        for name in positive:
            if getattr(self, name) < 1:
                bad(f"{flag(name)} must be a positive integer, got {getattr(self, name)!r}.")
        for name, allowed in (("arch", ARCHS), ("task", TASKS), ("normalize", NORMALIZE), ("dist", DISTS),
                              ("dtype", COMPUTE_DTYPES), ("save_dtype", SAVE_DTYPES), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                bad(f"{flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}.")
        if self.arch in ("llama", "gpt2") and self.hidden_size % self.num_heads:
            bad(f"--hidden-size ({self.hidden_size}) must be a multiple of --heads ({self.num_heads}).")
        if self.arch == "llama":
            if (self.hidden_size // self.num_heads) % 2:
                bad(f"the head size hidden_size/heads = {self.hidden_size // self.num_heads} must be even for RoPE.")
            if self.num_heads % self.num_kv_heads:
                bad(f"--heads ({self.num_heads}) must be a multiple of --kv-heads ({self.num_kv_heads}).")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"--max-tokens must be positive, got {self.max_tokens}.")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "val_fraction", "beta1", "beta2", "rope_theta",
                     "lora_alpha", "lora_dropout"):
            if not math.isfinite(getattr(self, name)):
                bad(f"{flag(name)} must be a finite number, got {getattr(self, name)!r}.")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            bad(f"need --lr > 0 and 0 <= --min-lr <= --lr; got lr {self.lr}, min_lr {self.min_lr}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.save_interval < 0:
            bad("--warmup-steps, --weight-decay, --grad-clip and --save-interval must not be negative.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            bad(f"--beta1 and --beta2 must be in [0, 1); got {self.beta1}, {self.beta2}.")
        if not 0 <= self.val_fraction < 0.5:
            bad(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}.")
        if self.num_threads < 0:
            bad(f"--threads must be >= 0, got {self.num_threads}.")
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
            bad(f"--lora-rank must be >= 0 and --lora-dropout in [0, 1); got {self.lora_rank}, {self.lora_dropout}.")
        if self.lora_rank > 0 and not self.init_from:
            bad("LoRA (--lora-rank > 0) adapts an existing model; pass --init-from CHECKPOINT_DIR.")
        if self.lora_rank > 0 and not self.lora_targets:
            bad("--lora-rank > 0 needs at least one module name in --lora-targets (e.g. q_proj,v_proj).")
        if self.task == "classify" and self.nproc > 1:
            bad(f"--task classify runs in one process; drop --nproc {self.nproc}.")
        if self.zero_shot and self.task != "classify":
            bad("--zero-shot only applies to --task classify.")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            bad(f"--init-from {self.init_from} is not a checkpoint directory (it has no config.json); pass a "
                "directory written by `llmos train` or a Hugging Face model directory.")
        if self.tokenizer is not None and not (Path(self.tokenizer) / "tokenizer.json").is_file():
            bad(f"--tokenizer {self.tokenizer} has no tokenizer.json; pass a model or tokenizer directory.")
        if self.shards_dir is not None and not self.data and not (Path(self.shards_dir) / "manifest.json").is_file():
            bad(f"--shards-dir {self.shards_dir} has no manifest.json and no --data was given to prepare there; "
                "point it at the data/ folder of an earlier run (or prepared shards), or add --data.")

    # ---- dict / file round trip ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain YAML/JSON values; `TrainConfig.from_dict(c.to_dict()) == c`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping of field names. Raises `InvalidRequestError` for unknown keys or wrong types
        (the message lists the valid keys). Lists may be given as one string (`data: corpus/`)."""
        if not isinstance(d, dict):
            raise InvalidRequestError(f"a training config must be a mapping of settings, got {type(d).__name__}.")
        unknown = sorted(str(k) for k in d if k not in field_names())
        if unknown:
            raise InvalidRequestError(f"unknown training setting(s) {', '.join(unknown)}; valid keys: "
                                      f"{', '.join(field_names())}.")
        config = cls(**{k: _coerce(k, v) for k, v in d.items()})
        check_types(config)
        return config


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """Gentle conversions a config file needs: a single string for a list, a comma list for lora_targets."""
    hint = _hints()[name]
    if typing.get_origin(hint) is list or list in typing.get_args(hint) or hint is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()] if name == "lora_targets" else [value]
        if isinstance(value, tuple):
            return list(value)
    base = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
    if float in base and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (float in base or int in base):  # YAML 1.1 reads "3e-4" as a string
        try:
            number = float(value)
        except ValueError:
            return value
        if float in base:
            return number
        if number.is_integer() and value.strip().lstrip("+-").replace("e", "").replace("E", "").isdigit():
            return int(number)
    if name in ("data",) and isinstance(value, list):
        return [str(v) for v in value]
    return value


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_types(c: TrainConfig) -> None:
    """Raise `InvalidRequestError` if a field holds a value of the wrong type (e.g. `seq_len: "long"`)."""
    for name, hint in _hints().items():
        value = getattr(c, name)
        if not _type_ok(value, hint):
            want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise InvalidRequestError(f"{flag(name)} ({name}) must be {want}, got {value!r}.")


# ---- files and overrides ----------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json (YAML) or .toml file. Raises `InvalidRequestError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"config file {path} does not exist; pass --config a .yaml or .toml file.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            d = tomllib.loads(text)
        elif suffix in (".yaml", ".yml", ".json"):
            d = yaml.safe_load(text)
        else:
            raise InvalidRequestError(f"config file {path}: unknown format {suffix!r}; "
                                      "use .yaml, .yml, .json or .toml.")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.MarkedYAMLError) and mark is not None:  # one line, not PyYAML's excerpt
            why = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem or e.context}"
        else:
            why = " ".join(str(e).split())
        raise InvalidRequestError(f"config file {path} could not be read: {why}".rstrip(".") + ".") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InvalidRequestError(f"config file {path} must hold a mapping of settings (key: value), "
                                  f"not a {type(d).__name__}.")
    return d


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`["lr=3e-4", "data=[a, b]"]` -> {"lr": 0.0003, "data": ["a", "b"]}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InvalidRequestError(f"--set {item!r} is not key=value (e.g. --set lr=3e-4).")
        if key not in field_names():
            raise InvalidRequestError(f"--set {key}: unknown training setting; valid keys: {', '.join(field_names())}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict,)) or (value is not None and not isinstance(value, (str, int, float, bool, list))):
            value = raw  # dates and other YAML types: keep the text
        out[key] = value
    return out


def load_config(path: str | Path | None, overrides: Iterable[str] = (), **flags: Any) -> TrainConfig:
    """The resolved configuration: the file at `path` (YAML or TOML; None = defaults), then the
    `key=value` `overrides`, then `flags` (the CLI's explicit options; None values are skipped).

    With `init_from` set and no `arch` given anywhere, `arch` is taken from the checkpoint, so that
    config.yaml records what was trained. Raises `InvalidRequestError` for unreadable files, unknown
    keys (listing the valid ones) and ill-typed or invalid values.
    """
    d = read_config_file(path) if path is not None else {}
    d.update(parse_overrides(overrides))
    d.update({k: v for k, v in flags.items() if v is not None})
    config = TrainConfig.from_dict(d)
    if config.init_from and "arch" not in d:
        config.arch = checkpoint_arch(config.init_from) or config.arch
    return config


def checkpoint_arch(path: str | Path) -> str | None:
    """The `arch` ("llama", "gpt2", "lstm") of the checkpoint at `path`, or None if its config.json is unreadable."""
    try:
        model_type = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type in ("gpt2",):
        return "gpt2"
    if model_type in ("lstm", "llmos_lstm"):
        return "lstm"
    if model_type in ("llama", "qwen2", "mistral"):
        return "llama"
    return model_type


def save_config(c: TrainConfig, path: str | Path) -> None:
    """Write `c` as YAML to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    text = "# the resolved training configuration (llmos train --config this-file reproduces the run)\n"
    text += yaml.safe_dump(c.to_dict(), sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
