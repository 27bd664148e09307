"""Fine-tuning from an existing checkpoint: load the base model, wrap it in LoRA adapters (through `peft`),
and merge them back so the result is a plain Hugging Face checkpoint.

Owns the base-model checks (`--init-from`, `--arch`, `--seq-len`) and the LoRA recipe. Never runs a training
loop (trainer.py and classify.py do) and never defines a model (llmos.model does).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmos.errors import InvalidRequestError, ModelLoadError
from llmos.model.config import LLAMA_LIKE, ModelConfig
from llmos.model.loader import load_model
from llmos.model.tokenizer import Tokenizer

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Llama-family projection names -> the GPT-2 modules that hold them. GPT-2 fuses q, k and v into one
# `attn.c_attn` projection, so any of q/k/v_proj selects it (LoRA then adapts all three together).
GPT2_TARGETS = {
    "q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
    "gate_proj": "mlp.c_fc", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj",
    "c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj",
}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the base model --------------------------------------------------------------------------------


def load_base(config: Any, arch: str | None = None, init_from: str | Path | None = None
              ) -> tuple[nn.Module, ModelConfig, Tokenizer]:
    """Load `config.init_from` (a Hugging Face checkpoint directory of a llama, qwen2, mistral or gpt2
    model) in float32 on the CPU, in train mode, for continued pretraining, SFT, LoRA or classification.

    `init_from`, when given, overrides `config.init_from`. `arch` is the architecture the user asked for
    with `--arch` (None: not asked). When None, a `config.arch` other than the default "llama" counts as
    asked (so a config file saying `arch: gpt2` is checked too, while the default never refuses a gpt2
    checkpoint). Families: "llama" covers llama, qwen2 and mistral; "gpt2" is gpt2; "lstm" is never a
    transformer checkpoint.

    Raises `InvalidRequestError` (no `init_from`; `config.seq_len` above the checkpoint's context),
    `ModelLoadError` (missing directory, a directory that is not a checkpoint, corrupt or mismatched
    weights, an `--arch` of another family) and `UnsupportedModelError` (an architecture llmos cannot run).
    """
    init_from = str(init_from or getattr(config, "init_from", None) or "")
    if not init_from:
        raise InvalidRequestError("fine-tuning needs a base model: pass --init-from DIR, a Hugging Face "
                                  "checkpoint directory (config.json + model.safetensors).")
    path = Path(init_from).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--init-from {init_from}: no such directory; pass a Hugging Face checkpoint "
                             "directory (config.json + model.safetensors), e.g. the --out of an earlier run.")
    if not path.is_dir():
        raise ModelLoadError(f"--init-from {init_from} is a file, not a checkpoint directory; pass the "
                             "directory that holds config.json and the safetensors weights.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--init-from {init_from} is not a checkpoint: it has no config.json. Pass the "
                             "directory that holds config.json and the safetensors weights.")
    if arch is None and getattr(config, "arch", "llama") not in (None, "", "llama", "auto"):
        arch = config.arch
    model_config = ModelConfig.from_dir(path)
    if arch and arch != "auto" and arch != model_config.family:
        raise ModelLoadError(
            f"--arch {arch} does not match --init-from {init_from}, a {model_config.model_type} checkpoint "
            f"(the {model_config.family} family). A checkpoint keeps its architecture: drop --arch, or pass "
            f"--arch {model_config.family}.")
    seq_len = getattr(config, "seq_len", None)
    if seq_len is not None and seq_len > model_config.context_length:
        raise InvalidRequestError(
            f"--seq-len {seq_len} is above the context of {init_from} ({model_config.context_length} tokens); "
            f"pass --seq-len {model_config.context_length} or less.")
    model, model_config = load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ModelLoadError(f"{init_from}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model_config.vocab_size} embeddings; the tokenizer belongs to another model.")
    return model.train(), model_config, tokenizer


# ---- LoRA ------------------------------------------------------------------------------------------


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a `prepare_model` LoRA wrapper (a `peft.PeftModel`)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def unwrap(model: nn.Module) -> nn.Module:
    """The llmos model inside a LoRA wrapper (the same modules, adapters injected), or `model` itself."""
    return model.get_base_model() if is_lora(model) else model


def lora_target_modules(model_config: ModelConfig, targets: list[str] | tuple[str, ...]) -> list[str]:
    """The module-name suffixes `peft` wraps for `targets` (`--lora-targets`).

    Llama family: the names themselves (q/k/v/o_proj, gate/up/down_proj, as in transformers). GPT-2:
    Llama names map onto GPT-2's modules (`GPT2_TARGETS`: q/k/v_proj -> the fused `attn.c_attn`,
    o_proj -> `attn.c_proj`, gate/up_proj -> `mlp.c_fc`, down_proj -> `mlp.c_proj`); GPT-2's own names
    are accepted too. Raises `InvalidRequestError` for an empty list or a name the family lacks.
    """
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    targets = [t.strip() for t in targets]
    if not targets:
        raise InvalidRequestError(f"--lora-targets is empty; name the projections to adapt, e.g. "
                                  f"{','.join(DEFAULT_LORA_TARGETS)}.")
    if model_config.model_type == "gpt2":
        known = GPT2_TARGETS
    elif model_config.model_type in LLAMA_LIKE:
        known = {t: t for t in LLAMA_TARGETS}
    else:
        raise InvalidRequestError(f"LoRA (--lora-rank) applies to transformer checkpoints (llama, qwen2, mistral, "
                                  f"gpt2), not {model_config.model_type}; train it with --lora-rank 0.")
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise InvalidRequestError(
            f"--lora-targets {','.join(unknown)}: no such projection in a {model_config.model_type} model; "
            f"choose from {', '.join(known)}.")
    return sorted({known[t] for t in targets})


def prepare_model(config: Any, model: nn.Module) -> nn.Module:
    """Wrap `model` for fine-tuning. `config.lora_rank == 0`: full fine-tuning, `model` is returned as is.

    Otherwise LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through
    `peft.get_peft_model`: each target Linear `W [out, in]` becomes `W x + (alpha / r) * B A x` with
    `A [r, in]` (Kaiming-uniform, from torch's global RNG) and `B [out, r]` (zeros, so the wrapped model
    starts equal to the base), dropout `lora_dropout` on the adapter input; every base parameter is frozen.
    The returned `peft.PeftModel` has the same `forward(input_ids [B, T]) -> logits [B, T, V]`.
    Raises `InvalidRequestError` for a bad rank, alpha, dropout or target list, or when peft is not installed.
    """
    rank = getattr(config, "lora_rank", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise InvalidRequestError(f"--lora-rank must be a non-negative integer (0 = full fine-tuning), got {rank!r}.")
    if rank == 0:
        return model
    alpha = getattr(config, "lora_alpha", 16.0)
    dropout = getattr(config, "lora_dropout", 0.0)
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InvalidRequestError(f"--lora-alpha must be a positive number, got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InvalidRequestError(f"--lora-dropout must be in [0, 1), got {dropout!r}.")
    if is_lora(model):
        raise InvalidRequestError("the model already carries LoRA adapters; merge them first (finalize_model).")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InvalidRequestError("--lora-rank needs the peft library: pip install -e '.[train]' (or pip install "
                                  "peft), or fine-tune all weights with --lora-rank 0.") from None

    targets = lora_target_modules(model.config, getattr(config, "lora_targets", DEFAULT_LORA_TARGETS))
    lora = LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                      bias="none", init_lora_weights=True)
    return get_peft_model(model, lora)


def finalize_model(config: Any, model: nn.Module, adapter_dir: str | Path | None = None) -> nn.Module:
    """The model to save: LoRA adapters merged into the base weights (`W += (alpha / r) * B A`, peft's
    `merge_and_unload`), so the checkpoint is a plain Hugging Face one; a model without adapters is
    returned unchanged. Returns the llmos model in eval mode.

    With `config.lora_merge` False and an `adapter_dir`, the adapter alone is also written there first
    (see `save_adapter`): the saved checkpoint is still the merged model (the kernel and transformers
    then run the same weights); the adapter is the small file to apply with peft to the original base.
    """
    if not is_lora(model):
        return model.eval()
    if not getattr(config, "lora_merge", True) and adapter_dir is not None:
        save_adapter(config, model, adapter_dir)
    return model.merge_and_unload().eval()


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged copy of a LoRA model for a checkpoint taken during training (best, last), in eval mode; the
    LoRA model itself is left as it is, bit for bit, so training (and an exact resume) goes on unchanged.
    Costs one more copy of the weights in memory. A model without adapters is returned as is."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload().eval()


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `adapter_state_dict` tensors back into a `prepare_model` LoRA model (resuming a LoRA run: load the
    base with `load_base`, wrap it with `prepare_model`, then this). Raises `ModelLoadError` if the names or
    shapes do not match the model's adapters (another rank, other targets or another base)."""
    from peft import set_peft_model_state_dict

    if not is_lora(model):
        raise InvalidRequestError("the model has no LoRA adapters to load into; wrap it with prepare_model first.")
    expected = adapter_state_dict(model)
    wrong = sorted(set(expected) ^ set(state)) or [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise ModelLoadError(f"the saved LoRA adapter does not fit this model (first mismatch: {wrong[0]}); resume "
                             "with the same --init-from, --lora-rank and --lora-targets as the run that saved it.")
    set_peft_model_state_dict(model, state)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under Hugging Face PEFT's file names, e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`).

    llmos names its modules as transformers does, so for the Llama family these are exactly the names
    `peft` gives an adapter of `transformers.LlamaForCausalLM` (GPT-2: see `save_adapter`).
    """
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(config: Any, model: nn.Module, path: str | Path) -> Path:
    """Write a LoRA model's adapter as `peft` does: `adapter_config.json` + `adapter_model.safetensors`,
    atomically (a temporary directory renamed into place; an existing adapter directory is replaced).

    `base_model_name_or_path` is the absolute `config.init_from`, so
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(init_from), path)` reproduces the
    fine-tuned model. GPT-2: llmos stores GPT-2's Conv1D weights as Linear `[out, in]`; the adapter
    matrices have the same shapes either way, and the config says `fan_in_fan_out: true` as peft needs
    for transformers' Conv1D. Raises `InvalidRequestError` if `model` has no adapters.
    """
    if not is_lora(model):
        raise InvalidRequestError("the model has no LoRA adapters to save; train with --lora-rank > 0.")
    lora = model.peft_config["default"].to_dict()
    init_from = getattr(config, "init_from", None)
    lora.update({"base_model_name_or_path": str(Path(init_from).absolute()) if init_from else None,
                 "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
                 "target_modules": sorted(lora["target_modules"]),
                 "fan_in_fan_out": unwrap(model).config.family == "gpt2"})
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(lora, indent=2, default=_json_default) + "\n")
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums (peft's TaskType, PeftType)
        return value.value
    return str(value)
