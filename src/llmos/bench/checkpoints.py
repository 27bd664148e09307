"""The checkpoints the benchmarks run on: the bundled default model, or random-weight Llama models built on the fly.

Owns model names (`default`, `llama-110m`, `tiny`, or a directory) -> a checkpoint directory, and the
byte-level BPE tokenizer written beside random weights. Never times anything.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos.errors import ModelLoadError

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")  # ids 0 and 1


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-family shape; `tie_word_embeddings` shares the embedding table with the LM head."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of the random weights (transformers' default)


# ANCHORS.md: hidden 768, 12 layers, 12 heads, intermediate 2048, vocabulary 32k, tied embeddings, ~110M parameters.
RANDOM_MODELS = {
    "llama-110m": LlamaShape(768, 12, 12, 2048, 32000, 1024),
    # --quick and the tests; wider weights so greedy outputs vary (a cross-check of repeated tokens checks little)
    "tiny": LlamaShape(64, 2, 4, 128, 512, 256, initializer_range=0.3),
}


def default_model_dir() -> Path:
    return Path(str(importlib.resources.files("llmos") / "assets" / "default-model"))


def cache_dir() -> Path:
    """Where random benchmark checkpoints are kept: $LLMOS_CACHE, else $XDG_CACHE_HOME/llmos, else ~/.cache/llmos."""
    if os.environ.get("LLMOS_CACHE"):
        return Path(os.environ["LLMOS_CACHE"]) / "bench"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmos" / "bench"


def resolve_model(name: str, cache: Path | None = None) -> Path:
    """The checkpoint directory for `name`: "default" (the bundled model), a key of `RANDOM_MODELS` (built once
    into `cache`, seed 0), or an existing directory. Raises `ModelLoadError` when it cannot be found."""
    if name == "default":
        path = default_model_dir()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the bundled default model is missing ({path}); build it with "
                                 "scripts/make_default_model.sh, or benchmark another model (--model llama-110m).")
        return path
    if name in RANDOM_MODELS:
        return ensure_random_model(name, cache or cache_dir())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model {name!r} is neither a directory nor one of default, "
                             f"{', '.join(RANDOM_MODELS)}; pass a Hugging Face checkpoint directory.")
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint (it needs config.json, tokenizer.json and "
                             "safetensors weights).")
    return path


def ensure_random_model(name: str, cache: Path) -> Path:
    """Build (once) the random-weight checkpoint `name` under `cache`; the same shape always gives the same weights."""
    shape = RANDOM_MODELS[name]
    path = cache / name
    stamp = path / "bench-shape.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        write_random_llama(tmp, shape)
        stamp_tmp = tmp / "bench-shape.json"
        stamp_tmp.write_text(json.dumps(asdict(shape)))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_random_llama(path: Path, shape: LlamaShape, seed: int = 0) -> None:
    """Write a random-weight Llama checkpoint (safetensors, fp32) and its tokenizer into `path`."""
    import torch
    import transformers as T

    config = T.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings, initializer_range=shape.initializer_range,
        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    T.LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    write_tokenizer(path, shape.vocab_size)


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Write a byte-level BPE `tokenizer.json` with exactly `vocab_size` ids, so every id decodes to bytes.

    Ids 0-1 are `SPECIAL_TOKENS`, 2-257 the 256 byte symbols, the rest two-byte merges in a fixed order
    (no training: the weights are random, only the id space and a working decoder matter).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + len(alphabet)}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    merges = []
    pairs = ((a, b) for a in alphabet for b in alphabet)
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[1]}))
