"""Hugging Face checkpoint directories in and out: config.json + safetensors (single or sharded).

Owns the weight-name mapping between HF and llmos. Never unpickles: `.bin`/`.pt` checkpoints are refused.
Writes are atomic: a new checkpoint is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmos.errors import ModelLoadError
from llmos.model.config import ModelConfig, rope_inv_freq
from llmos.model.lstm import LSTMForCausalLM
from llmos.model.transformer import CausalLM, GPT2LMHeadModel, LlamaForCausalLM

INDEX_FILE = "model.safetensors.index.json"
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e}); restore it from the checkpoint.") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing; "
                                 "download or copy the complete checkpoint.")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any((path / n).exists() for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")):
        raise ModelLoadError(f"{path} holds only pickled PyTorch weights (.bin/.pt); llmos loads safetensors only "
                             "because unpickling can run arbitrary code. Convert it with transformers: "
                             "model.save_pretrained(dir, safe_serialization=True).")
    raise ModelLoadError(f"{path} has no model.safetensors or {INDEX_FILE}; it is not a complete checkpoint.")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = sf.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{f} is corrupt or truncated ({e}); re-download or re-save the checkpoint.") from None
    return tensors


def _hf_to_llmos(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in hf.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if config.family == "gpt2":
            if not key.startswith(("transformer.", "lm_head.")):
                key = "transformer." + key
            if key.endswith(GPT2_CONV1D):
                t = t.t().contiguous()
        out[key] = t
    return out


def _llmos_to_hf(model: CausalLM | LSTMForCausalLM) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.family == "gpt2" and key.endswith(GPT2_CONV1D):
            t = t.t()
        out[key] = t.contiguous()
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[CausalLM | LSTMForCausalLM, ModelConfig]:
    """Load a HF checkpoint directory into an llmos model in eval mode (an "llmos_lstm" checkpoint gives an
    `LSTMForCausalLM`).

    `dtype` defaults to float32 on CPU and to the checkpoint's dtype on CUDA.
    Raises `ModelLoadError` (missing directory or files, corrupt safetensors, missing/unexpected
    weights, shape mismatch) or `UnsupportedModelError` (architecture llmos cannot run).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist; pass --model a Hugging Face "
                             "checkpoint directory (see `llmos models`).")
    config = ModelConfig.from_dir(path)
    tensors = _hf_to_llmos(config, _read_tensors(_weight_files(path)))
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else DTYPES.get(config.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = _model_class(config)(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match config.json ({config.model_type}): missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "The config and the weights come from different models; restore the matching pair.")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise ModelLoadError(f"{path}: weight {key} has shape {tuple(tensors[key].shape)} but config.json implies "
                                 f"{tuple(shape)}; the config and the weights come from different models.")
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.family == "gpt2":
        model.lm_head.weight = model.transformer.wte.weight
    elif config.family == "lstm":
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.lstm.flatten_parameters()  # one contiguous weight buffer for cuDNN (a no-op on the CPU)
    else:
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = torch.tensor(rope_inv_freq(config), dtype=torch.float32, device=device)
    return model.eval(), config


def _model_class(config: ModelConfig) -> type[torch.nn.Module]:
    return {"gpt2": GPT2LMHeadModel, "lstm": LSTMForCausalLM}.get(config.family, LlamaForCausalLM)


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """`generation_config.json` as a dict, or {} when absent or unreadable."""
    f = Path(path) / "generation_config.json"
    try:
        d = json.loads(f.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def save_model(model: CausalLM | LSTMForCausalLM, config: ModelConfig, path: str | Path, dtype: torch.dtype | None = None,
               tokenizer: Any = None, max_shard_bytes: int = 4 * 2**30,
               generation_config: dict | None = None) -> Path:
    """Write a HF checkpoint directory that `transformers.AutoModelForCausalLM` loads (an LSTM checkpoint
    loads in llmos only: transformers has no such architecture).

    Writes config.json, model.safetensors (or shards + index above `max_shard_bytes`),
    generation_config.json and, if given, the tokenizer (`tokenizer.save(dir)`), into a temporary
    directory beside `path`, then swaps it into place, so a crash never leaves a partial checkpoint
    where a good one was.
    """
    path = check_checkpoint_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = _llmos_to_hf(model)
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        cfg = config.to_hf()
        cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        _write_tensors(tmp, {k: v.detach().cpu() for k, v in tensors.items()}, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = generation_config or {"bos_token_id": config.bos_token_id,
                                    "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1
                                    else config.eos_token_ids or None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        _make_readable(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_checkpoint_target(path: str | Path) -> Path:
    """Where a checkpoint may be written, as an absolute path; raises `ModelLoadError` otherwise.

    A new path, an empty directory, or an existing checkpoint (a directory with config.json, which the
    save replaces whole) are fine. Anything else is refused, so a save can never replace a directory
    of other files: the file system root, the home directory, the current directory or one of its
    parents, a file, or a non-empty directory without config.json.
    """
    path = Path(path).expanduser().absolute()
    cwd = Path.cwd().absolute()
    fix = "choose a new directory (e.g. --out my-model)"
    if path.name in ("", ".", "..") or path == Path.home().absolute() or cwd == path or path in cwd.parents:
        raise ModelLoadError(f"refusing to write a checkpoint over {path}: it would replace a directory you are "
                             f"using; {fix}.")
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ModelLoadError(f"{path} exists and is not a directory; {fix}.")
        if any(path.iterdir()) and not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a non-empty directory that is not a model checkpoint (it has no "
                                 f"config.json), so llmos will not replace it; {fix}.")
    return path


def _write_tensors(d: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _make_readable(d: Path) -> None:
    """Give the checkpoint ordinary permissions (mkdtemp makes 0700): 0777/0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Replace the directory `path` with `tmp`. Where the system can, in one atomic exchange; else `path` ->
    `.<name>.old-PID`, then `tmp` -> `path` (a process killed between the two leaves no `path`: the trainer's
    `checkpoint.clean_stale` puts the whole one back and deletes `.old-*` leftovers)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous `path`
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
