"""Hibernation images: a process (tokens, sampling state with its RNG, its KV blocks) saved to disk so
that a new kernel, after a restart, can resume it.

Owns the image format (one safetensors file, written atomically, checksummed) and where images live
(LLMOS_HOME/hibernate/<owner digest>/<hid>.safetensors). Never unpickles, never overwrites a good image
with a partial one, and never touches the scheduler's queues: the kernel decides when to hibernate.

File layout: tensors "kv" [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] (a transformer's
K/V) or "state" [num_layers, 2, hidden] (a recurrent model's (h, c) state slot, see kvcache.py) and
"rng_state" [n] uint8 (each only when present); `__metadata__` holds "llmos_hibernation", a JSON document
with every other field plus the format version and the sha256 of the tensor bytes, and
"llmos_hibernation_sha256", the sha256 of that document. So damage to the tensor data and damage to the
header are both detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmos.errors import HibernationError, InvalidRequestError
from llmos.kernel.proc import Process
from llmos.model.sampling import SamplingParams

FORMAT = "llmos-hibernation"
FORMAT_VERSION = 1
KV_LAYOUT_VERSION = 1  # bump when what a KV cache slot holds changes (e.g. K stored before/after RoPE)
DOC_KEY = "llmos_hibernation"
DOC_SHA_KEY = "llmos_hibernation_sha256"
SUFFIX = ".safetensors"
HID_PATTERN = re.compile(r"h[0-9a-f]{10}")
TENSOR_FIELDS = ("kv", "rng_state", "state")
# ModelConfig fields that decide what K/V a token gets (bos/eos ids and torch_dtype do not; dtype is separate).
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "intermediate_size", "max_position_embeddings", "head_dim", "norm_eps", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "attention_bias", "o_proj_bias", "mlp_bias", "hidden_act",
               "sliding_window")
_DROP = "delete it; the process cannot be resumed and its request must be spawned again"


def new_hid() -> str:
    """A fresh image id: 'h' + 10 hex characters (40 random bits)."""
    return "h" + secrets.token_hex(5)


@dataclass(eq=False)
class HibernationImage:
    """One hibernated process. Compare images field by field (tensors have no single truth value).

    `prompt_token_ids` / `output_token_ids`: token ids. `num_computed_tokens`: leading tokens of
    prompt + output whose K/V are in `kv`. `params`: SamplingParams fields as a JSON-able dict (see
    `params_to_dict`). `rng_state`: uint8 [n] from `torch.Generator.get_state()` of the process's seeded
    generator on a `rng_device` ("cpu"/"cuda") generator; both None when it had none (no seed).
    `kv`: [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim] in block-table order,
    num_blocks >= ceil(num_computed_tokens / block_size). `state`: a recurrent model's state slot after
    num_computed_tokens tokens, [num_layers, 2 (h, c), hidden]. At most one of the two is given, and
    neither exactly when num_computed_tokens == 0.
    `block_size`: tokens per block in `kv`. `created`: unix time (seconds). `hid`: image id (`new_hid`).
    `text`: output text released so far. `num_preemptions`: carried over into the resumed Process.
    `extra`: any other JSON-able state the kernel wants back (e.g. held characters of the stream).
    """

    owner: str
    model_name: str
    model_fingerprint: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed_tokens: int
    params: dict
    block_size: int
    priority: int = 0
    rng_state: torch.Tensor | None = None
    rng_device: str | None = None
    kv: torch.Tensor | None = None
    state: torch.Tensor | None = None
    created: float = field(default_factory=time.time)
    hid: str = field(default_factory=new_hid)
    text: str = ""
    num_preemptions: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def sampling_params(self) -> SamplingParams:
        """`params` as SamplingParams (validated). Raises `HibernationError` if they are not valid."""
        try:
            return params_from_dict(self.params).validate()
        except (TypeError, InvalidRequestError) as e:
            raise HibernationError(f"hibernation image {self.hid} has invalid sampling parameters ({e}); {_DROP}.") \
                from None

    def restore_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator on `device` in the saved state (it draws what the original would have), or None.

        Raises `HibernationError` when the state came from another device type (a CUDA generator's
        state does not fit a CPU one): resume it on a `rng_device` kernel.
        """
        if self.rng_state is None:
            return None
        device = torch.device(device)
        if device.type != self.rng_device:
            raise HibernationError(f"hibernated process {self.hid} was sampling with a {self.rng_device} random "
                                   f"generator; resume it on a kernel running on {self.rng_device}, not {device.type}.")
        g = torch.Generator(device=device)
        g.set_state(self.rng_state)
        return g

    @classmethod
    def from_process(cls, p: Process, *, model_fingerprint: str, block_size: int, kv: torch.Tensor | None,
                     generator: torch.Generator | None, text: str = "", extra: dict | None = None,
                     state: torch.Tensor | None = None) -> HibernationImage:
        """An image of `p`. `kv` comes from `gather_kv`, or `state` from a recurrent model's slot (None for
        both drops the cache: the image then records num_computed_tokens = 0 and the resumed process
        recomputes everything)."""
        return cls(owner=p.owner, model_name=p.model, model_fingerprint=model_fingerprint,
                   prompt_token_ids=list(p.prompt_token_ids), output_token_ids=list(p.output_token_ids),
                   num_computed_tokens=p.num_computed_tokens if kv is not None or state is not None else 0,
                   params=params_to_dict(p.params), block_size=block_size, priority=p.priority,
                   rng_state=None if generator is None else generator.get_state(),
                   rng_device=None if generator is None else generator.device.type,
                   kv=kv, state=state, text=text, num_preemptions=p.num_preemptions, extra=dict(extra or {}))

    def to_process(self, pid: int) -> Process:
        """A NEW Process with this image's tokens, params and counters (the kernel admits it and puts
        the K/V back with `scatter_kv`). Raises `HibernationError` for invalid sampling parameters."""
        return Process(pid=pid, owner=self.owner, model=self.model_name, prompt_token_ids=list(self.prompt_token_ids),
                       params=self.sampling_params(), output_token_ids=list(self.output_token_ids),
                       num_computed_tokens=self.num_computed_tokens, priority=self.priority,
                       num_preemptions=self.num_preemptions)


def params_to_dict(params: SamplingParams) -> dict:
    """SamplingParams as a JSON-able dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def params_from_dict(d: dict) -> SamplingParams:
    """The inverse of `params_to_dict` (lists become tuples). Raises TypeError for unknown fields."""
    return SamplingParams(**d)


# ---- KV in and out of the pool ---------------------------------------------------------------------


def gather_kv(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_table: list[int],
              num_computed_tokens: int) -> torch.Tensor | None:
    """Copy a process's computed K/V out of the pool, to the CPU.

    `kv_caches[layer] = (k, v)`, each [num_blocks, block_size, num_kv_heads, head_dim] (KVPool).
    Returns [num_layers, 2, ceil(num_computed_tokens / block_size), block_size, num_kv_heads, head_dim],
    blocks in `block_table` order, or None when num_computed_tokens == 0.
    """
    if num_computed_tokens == 0:
        return None
    block_size = kv_caches[0][0].shape[1]
    n = -(-num_computed_tokens // block_size)
    if len(block_table) < n:
        raise ValueError(f"gather_kv: {num_computed_tokens} computed tokens need {n} blocks, "
                         f"the table has {len(block_table)}")
    idx = torch.tensor(block_table[:n], device=kv_caches[0][0].device)
    return torch.stack([torch.stack((k[idx], v[idx])) for k, v in kv_caches]).cpu()


def scatter_kv(image: HibernationImage, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
               block_table: list[int]) -> None:
    """Write `image.kv`'s first num_computed_tokens tokens into the pool blocks of `block_table`.

    Works token by token, so the pool's block size may differ from `image.block_size`. The table must
    cover num_computed_tokens tokens (a programming error otherwise). Raises `HibernationError` when the
    image's layers / heads / head_dim do not match the pool (it comes from another model).
    """
    if image.kv is None or image.num_computed_tokens == 0:
        return
    layers, _, blocks, image_block_size, heads, head_dim = image.kv.shape
    k0 = kv_caches[0][0]
    if layers != len(kv_caches) or tuple(k0.shape[2:]) != (heads, head_dim):
        raise HibernationError(
            f"hibernated process {image.hid} holds K/V for {layers} layers x {heads} heads x {head_dim}, but this "
            f"kernel's model has {len(kv_caches)} x {k0.shape[2]} x {k0.shape[3]}; it was hibernated from model "
            f"{image.model_name!r}: load that model to resume it.")
    n, block_size = image.num_computed_tokens, k0.shape[1]
    if len(block_table) * block_size < n:
        raise ValueError(f"scatter_kv: {n} tokens need {-(-n // block_size)} blocks, table has {len(block_table)}")
    tokens = image.kv.reshape(layers, 2, blocks * image_block_size, heads, head_dim)[:, :, :n]
    pos = torch.arange(n, device=k0.device)
    slots = torch.tensor(block_table, device=k0.device)[pos // block_size] * block_size + pos % block_size
    for layer, (k, v) in enumerate(kv_caches):
        k.view(-1, heads, head_dim)[slots] = tokens[layer, 0].to(k.device, k.dtype)
        v.view(-1, heads, head_dim)[slots] = tokens[layer, 1].to(v.device, v.dtype)


def scatter_state(image: HibernationImage, pool, slot: int) -> None:
    """Write `image.state` [num_layers, 2, hidden] into state slot `slot` of `pool` (a kvcache.StatePool).
    Raises `HibernationError` when its layers / width do not match the pool (it comes from another model)."""
    if image.state is None:
        return
    want = (pool.num_layers, 2, pool.hidden_size)
    if tuple(image.state.shape) != want:
        raise HibernationError(
            f"hibernated process {image.hid} holds a recurrent state of shape {list(image.state.shape)}, but this "
            f"kernel's model keeps {list(want)}; it was hibernated from model {image.model_name!r}: load that model "
            "to resume it.")
    pool.write_state(slot, image.state)


# ---- fingerprints -------------------------------------------------------------------------------------


def model_fingerprint(model_config_dict: dict, dtype: str | torch.dtype, weights_hash: str | None = None) -> str:
    """sha256 hex of what makes K/V compatible: the architecture fields (ARCH_FIELDS of
    `ModelConfig.to_dict()`; a Hugging Face config.json dict is converted first), the KV dtype
    ("float32" or torch.float32), the KV layout version and, if given, `weights_hash`
    (`weights_fingerprint`). Without it, two checkpoints of one architecture share a fingerprint.
    """
    d = dict(model_config_dict)
    if "num_layers" not in d:
        from llmos.model.config import ModelConfig
        d = ModelConfig.from_hf(d).to_dict()
    arch = {k: d.get(k) for k in ARCH_FIELDS}
    for k in ("norm_eps", "rope_theta"):
        if isinstance(arch[k], int) and not isinstance(arch[k], bool):
            arch[k] = float(arch[k])
    arch["rope_scaling"] = _floats(arch["rope_scaling"])
    doc = {"arch": arch, "dtype": str(dtype).removeprefix("torch."), "kv_layout": KV_LAYOUT_VERSION,
           "weights": weights_hash}
    return hashlib.sha256(_canonical_json(doc).encode()).hexdigest()


def _floats(x: Any) -> Any:
    """Every number inside `x` as a float, so {"factor": 8} and {"factor": 8.0} hash alike."""
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return x


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex over every state-dict tensor's name, dtype, shape and bytes (tied tensors once).

    Every byte is hashed, so two weight sets that differ anywhere get different fingerprints. Cost:
    sha256 runs at about 2 GB/s (with SHA CPU extensions): ~10 ms for a 5M-parameter float32 model,
    ~0.2 s for 110M; CUDA weights are copied to the CPU first. For multi-GB checkpoints compute it once
    per kernel start, not per hibernation.
    """
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if key in seen and t.numel():
            h.update(f"alias:{seen[key]}".encode())
            continue
        seen[key] = name
        h.update(_bytes(t))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (copied to the CPU and made contiguous only when needed)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _canonical_json(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), allow_nan=False)


# ---- one image file ---------------------------------------------------------------------------------------


def save_image(path: Path, image: HibernationImage) -> None:
    """Write `image` to `path` atomically, mode 0600: a temp file in the same directory, flushed and
    fsynced, renamed over `path`, then the directory fsynced. On any failure the temp file is removed
    and an existing `path` is left untouched.

    Raises `HibernationError` when the file cannot be written (disk full, permissions) and ValueError
    for an inconsistent image (a programming error).
    """
    problems = _problems(image)
    if problems:
        raise ValueError(f"save_image({image.hid}): inconsistent image: {'; '.join(problems)}")
    path = Path(path)
    tensors = {name: getattr(image, name).detach().cpu().contiguous()
               for name in TENSOR_FIELDS if getattr(image, name) is not None}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION,
           **{f.name: getattr(image, f.name) for f in dataclasses.fields(image) if f.name not in TENSOR_FIELDS},
           "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                       for k, t in tensors.items()},
           "tensor_sha256": _tensor_sha256(tensors)}
    doc_json = json.dumps(doc, allow_nan=False)
    metadata = {"format": "pt", DOC_KEY: doc_json, DOC_SHA_KEY: hashlib.sha256(doc_json.encode()).hexdigest()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # mode 0600
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:
        raise HibernationError(f"cannot write hibernation image {path} ({e}); free some disk space or fix the "
                               "permissions of that directory, then hibernate again (any older image there is "
                               "unchanged).") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_image(path: Path, expected_fingerprint: str | None = None) -> HibernationImage:
    """Read and verify the image at `path` (safetensors safe loading only; nothing is unpickled).

    Raises `HibernationError`, naming the file and what to do, when it is missing, empty, truncated,
    not a safetensors file (e.g. a pickle), has missing or bad metadata, a newer/unknown format version,
    a checksum mismatch (header or tensor data changed after writing), tensors that contradict the
    metadata, or, given `expected_fingerprint`, a different model's fingerprint.
    """
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as sf:
            doc = _check_doc(path, sf.metadata() or {})
            if expected_fingerprint is not None and doc["model_fingerprint"] != expected_fingerprint:
                raise HibernationError(
                    f"{path} was hibernated from model {doc['model_name']!r} (fingerprint "
                    f"{doc['model_fingerprint'][:12]}), not the model this kernel runs (fingerprint "
                    f"{expected_fingerprint[:12]}); load that model to resume it.")
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HibernationError(f"{path} {_what_is_wrong(path)} ({e}); {_DROP}.") from None
    described = {k: (v["dtype"], v["shape"]) for k, v in doc["tensors"].items()}
    found = {k: (str(t.dtype).removeprefix("torch."), list(t.shape)) for k, t in tensors.items()}
    if described != found:
        raise HibernationError(f"{path} is corrupt: its tensors {found} do not match its metadata {described}; "
                               f"{_DROP}.")
    if _tensor_sha256(tensors) != doc["tensor_sha256"]:
        raise HibernationError(f"{path} is corrupt: its tensor data fails the checksum (it changed after it was "
                               f"written); {_DROP}.")
    image = HibernationImage(**{f.name: doc[f.name] for f in dataclasses.fields(HibernationImage)
                                if f.name not in TENSOR_FIELDS},
                             **{name: tensors.get(name) for name in TENSOR_FIELDS})
    problems = _problems(image)
    if problems:
        raise HibernationError(f"{path} is inconsistent: {'; '.join(problems)}; {_DROP}.")
    return image


# JSON type of every metadata field; a tuple means "one of".
_DOC_TYPES: dict[str, Any] = {
    "owner": str, "model_name": str, "model_fingerprint": str, "prompt_token_ids": list, "output_token_ids": list,
    "num_computed_tokens": int, "params": dict, "block_size": int, "priority": int, "rng_device": (str, type(None)),
    "created": (int, float), "hid": str, "text": str, "num_preemptions": int, "extra": dict, "tensors": dict,
    "tensor_sha256": str}


def _read_doc(path: Path) -> dict:
    """The verified metadata document of the image at `path` (header only; tensors are not read)."""
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as sf:
            meta = sf.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HibernationError(f"{path} {_what_is_wrong(path)} ({e}); {_DROP}.") from None
    return _check_doc(path, meta)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise HibernationError(f"no hibernation image at {path}: it was removed or never written; check the id "
                               "(list the hibernated processes to see which exist).")
    if not os.access(path, os.R_OK):
        raise HibernationError(f"cannot read hibernation image {path}: permission denied. The image itself may be "
                               "fine: give its owner read permission (chmod 600) and try again.")


def _check_doc(path: Path, meta: dict[str, str]) -> dict:
    """The metadata document in safetensors header metadata `meta`, checked against its checksum, the
    format version and the type of every field."""
    if DOC_KEY not in meta or DOC_SHA_KEY not in meta:
        raise HibernationError(f"{path} has no {DOC_KEY!r} metadata: it is damaged, or a safetensors file that "
                               f"is not an llmos hibernation image; {_DROP}.")
    if hashlib.sha256(meta[DOC_KEY].encode()).hexdigest() != meta[DOC_SHA_KEY]:
        raise HibernationError(f"{path} is corrupt: its header fails the checksum (it changed after it was "
                               f"written); {_DROP}.")
    try:
        doc = json.loads(meta[DOC_KEY])
    except json.JSONDecodeError as e:
        raise HibernationError(f"{path} has unreadable metadata ({e}); {_DROP}.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise HibernationError(f"{path} is not an llmos hibernation image (format {_get(doc, 'format')!r}); {_DROP}.")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        fix = "upgrade llmos to resume it" if newer else _DROP
        raise HibernationError(f"{path} has hibernation format version {version!r}; this llmos reads version "
                               f"{FORMAT_VERSION}; {fix}.")
    for key, kind in _DOC_TYPES.items():
        if key not in doc:
            raise HibernationError(f"{path} is missing the metadata field {key!r}; {_DROP}.")
        value = doc[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise HibernationError(f"{path} has a metadata field {key!r} of the wrong type "
                                   f"({type(value).__name__}); {_DROP}.")
    bad_tensors = [k for k, v in doc["tensors"].items() if k not in TENSOR_FIELDS or not isinstance(v, dict)
                   or not isinstance(v.get("dtype"), str) or not isinstance(v.get("shape"), list)]
    if bad_tensors:
        raise HibernationError(f"{path} describes unknown or malformed tensors {bad_tensors}; {_DROP}.")
    return doc


def _get(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


def _what_is_wrong(path: Path) -> str:
    """A phrase for a file safetensors cannot open, guessed from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "cannot be read"
    if not head:
        return "is empty (its write was interrupted)"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (torch.save?), not a safetensors file; llmos never unpickles"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "is a Python pickle, not a safetensors file; llmos never unpickles"
    return "is truncated, corrupt, or not a safetensors file"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _problems(image: HibernationImage) -> list[str]:
    """What is inconsistent in `image` (empty when it is fine to save or resume)."""
    out = []
    if not isinstance(image.hid, str) or not HID_PATTERN.fullmatch(image.hid):
        out.append(f"hid {image.hid!r} is not 'h' + 10 hex characters")
    tokens = image.prompt_token_ids + image.output_token_ids
    if not image.prompt_token_ids:
        out.append("the prompt is empty")
    if not all(_is_int(t) and t >= 0 for t in tokens):
        out.append("token ids must be integers >= 0")
    if not _is_int(image.block_size) or image.block_size < 1:
        out.append(f"block_size {image.block_size!r} must be >= 1")
    n = image.num_computed_tokens
    if not _is_int(n) or not 0 <= n <= len(tokens):
        out.append(f"num_computed_tokens {n!r} must be in [0, {len(tokens)}]")
    if not _is_int(image.num_preemptions) or image.num_preemptions < 0:
        out.append(f"num_preemptions {image.num_preemptions!r} must be >= 0")
    try:
        params_from_dict(image.params).validate()
    except (TypeError, InvalidRequestError) as e:
        out.append(f"bad sampling parameters ({e})")
    kv, state = image.kv, image.state
    held = kv if kv is not None else state
    if kv is not None and state is not None:
        out.append("kv and state are both present; an image holds one or the other")
    elif (held is None) != (n == 0):
        out.append(f"{'state' if state is not None else 'kv'} is {'missing' if held is None else 'present'} "
                   f"but num_computed_tokens is {n}")
    elif state is not None:
        if state.dim() != 3 or state.shape[1] != 2 or not state.is_floating_point():
            out.append(f"state has shape {list(state.shape)} ({state.dtype}); expected floating point "
                       "[num_layers, 2, hidden]")
    elif kv is not None:
        if kv.dim() != 6 or kv.shape[1] != 2 or kv.shape[3] != image.block_size or not kv.is_floating_point():
            out.append(f"kv has shape {list(kv.shape)} ({kv.dtype}); expected floating point [num_layers, 2, "
                       f"num_blocks, {image.block_size}, num_kv_heads, head_dim]")
        elif _is_int(n) and _is_int(image.block_size) and kv.shape[2] * image.block_size < n:
            out.append(f"kv has {kv.shape[2]} blocks of {image.block_size} tokens, fewer than the "
                       f"{-(-n // image.block_size)} that {n} computed tokens need")
    if (image.rng_state is None) != (image.rng_device is None):
        out.append("rng_state and rng_device must be given together")
    elif image.rng_state is not None and (image.rng_state.dtype != torch.uint8 or image.rng_state.dim() != 1):
        out.append(f"rng_state must be a 1-D uint8 tensor, got {image.rng_state.dtype} {list(image.rng_state.shape)}")
    return out


# ---- where images live ---------------------------------------------------------------------------------------


class HibernationStore:
    """Images under `root/hibernate/<owner digest>/<hid>.safetensors`, directories 0700, files 0600.

    The owner directory is a sha256 digest of the owner, so owners never see each other's images and
    any owner string is safe as a path. Every method validates `hid` (see `new_hid`) before touching
    the file system, so an id such as "../x" is refused.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def owner_dir(self, owner: str) -> Path:
        return self.root / "hibernate" / hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]

    def path(self, hid: str, owner: str) -> Path:
        """The file of image `hid` of `owner`. Raises `HibernationError` for a malformed hid."""
        if not isinstance(hid, str) or not HID_PATTERN.fullmatch(hid):
            raise HibernationError(f"invalid hibernation id {hid!r}: ids look like 'h' followed by 10 hex "
                                   "characters (e.g. h3f9a0c12be); list the hibernated processes to see them.")
        return self.owner_dir(owner) / f"{hid}{SUFFIX}"

    def save(self, image: HibernationImage) -> Path:
        """Write `image` (atomically, replacing an older image with its hid); return its path."""
        path = self.path(image.hid, image.owner)
        try:
            for d in (self.root / "hibernate", path.parent):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
        except OSError as e:
            raise HibernationError(f"cannot create the hibernation directory {path.parent} ({e}); fix the "
                                   "permissions of LLMOS_HOME or set LLMOS_HOME to a writable folder.") from None
        save_image(path, image)
        return path

    def load(self, hid: str, owner: str, expected_fingerprint: str | None = None) -> HibernationImage:
        """Image `hid` of `owner`, verified (see `load_image`). Raises `HibernationError`, with the same
        "no hibernated process" message for an unknown hid and another owner's."""
        path = self.path(hid, owner)
        if not path.is_file():
            raise self._not_found(hid)
        image = load_image(path, expected_fingerprint)
        if image.owner != owner:
            raise self._not_found(hid)
        if image.hid != hid:
            raise HibernationError(f"{path} holds image {image.hid}, not {hid} (it was renamed); rename it back "
                                   f"to {image.hid}{SUFFIX}.")
        return image

    def list(self, owner: str) -> list[dict]:
        """`owner`'s images, oldest first: dicts with hid, model, prompt_tokens, output_tokens, size_bytes,
        created (unix time), status ("ok", "corrupt" or "unreadable") and error (None, or why it cannot be resumed).

        Reads headers only: a damaged header is reported here, damaged tensor data at `load`.
        """
        d = self.owner_dir(owner)
        if not d.is_dir():
            return []
        out = []
        for f in d.iterdir():
            if f.suffix != SUFFIX or not HID_PATTERN.fullmatch(f.stem):
                continue  # temp files of writes in progress, or not ours
            entry = {"hid": f.stem, "model": None, "prompt_tokens": None, "output_tokens": None,
                     "size_bytes": 0, "created": None, "status": "corrupt", "error": None}
            try:
                st = f.stat()
                entry.update(size_bytes=st.st_size, created=st.st_mtime)
                doc = _read_doc(f)
                if doc["owner"] != owner or doc["hid"] != f.stem:
                    raise HibernationError(f"{f} belongs to another owner or was renamed; {_DROP}.")
                entry.update(model=doc["model_name"], prompt_tokens=len(doc["prompt_token_ids"]),
                             output_tokens=len(doc["output_token_ids"]), created=doc["created"], status="ok")
            except (HibernationError, OSError) as e:
                entry["error"] = str(e)
                if isinstance(e, PermissionError) or "permission denied" in str(e):
                    entry["status"] = "unreadable"
            out.append(entry)
        return sorted(out, key=lambda e: (e["created"] or 0, e["hid"]))

    def remove(self, hid: str, owner: str) -> None:
        """Delete image `hid` of `owner`. Raises `HibernationError` if there is none."""
        path = self.path(hid, owner)
        try:
            path.unlink()
        except FileNotFoundError:
            raise self._not_found(hid) from None

    @staticmethod
    def _not_found(hid: str) -> HibernationError:
        return HibernationError(f"no hibernated process {hid}; list the hibernated processes to see their ids.")


def default_store() -> HibernationStore:
    """The store in LLMOS_HOME (default ~/.llmos); nothing is created until the first save."""
    from llmos.fs.registry import llmos_home
    return HibernationStore(llmos_home())
