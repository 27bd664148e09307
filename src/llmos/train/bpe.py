"""Byte-level BPE tokenizer training with the Hugging Face `tokenizers` library.

Owns the tokenizer recipe (GPT-2 style byte-level BPE) and the files it is saved as.
Never implements BPE itself.

Decisions, so that a checkpoint reads the same everywhere:
- The first special token (default `<|endoftext|>`, id 0) is both BOS and EOS, as in GPT-2; the
  training stream puts it between documents (see `llmos.train.data`).
- `encode(text)` with special tokens on *prepends* it (a `TemplateProcessing` post-processor, like
  Llama's BOS): a prompt then starts the way every training document started. `add_special_tokens=False`
  gives the bare text tokens. No EOS is appended.
- tokenizer_config.json names `PreTrainedTokenizerFast`, so `transformers.AutoTokenizer` loads
  tokenizer.json as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmos.errors import DataError
from llmos.train.data import read_documents

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
NUM_BYTES = 256


def min_vocab_size(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> int:
    """Smallest vocabulary a byte-level BPE can have: the 256 byte tokens plus the special tokens."""
    return NUM_BYTES + len(special_tokens)


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> None:
    """Raise `DataError` unless `vocab_size` holds the 256 bytes and the special tokens."""
    if not special_tokens:
        raise DataError("a tokenizer needs at least one special token (the end-of-text token).")
    if vocab_size < min_vocab_size(special_tokens):
        raise DataError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{min_vocab_size(special_tokens)} (256 bytes + {len(special_tokens)} special token(s)); "
            f"use {min_vocab_size(special_tokens)} or more (a few thousand is typical)."
        )


def train_tokenizer_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019).

    Special tokens take ids 0.. in order, then the 256 bytes, then merges up to `vocab_size`
    (fewer if the text runs out of pairs seen at least twice). Raises `DataError` if `vocab_size`
    is below `min_vocab_size(special_tokens)`.
    """
    special_tokens = list(special_tokens)
    check_vocab_size(vocab_size, special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = special_tokens[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None,
                   special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` that `transformers.AutoTokenizer` loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    eot = special_tokens[0]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
    }
    if len(special_tokens) > 1:
        config["additional_special_tokens"] = list(special_tokens[1:])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eot, "eos_token": eot, "pad_token": eot}, indent=2) + "\n", encoding="utf-8"
    )


def train_tokenizer(
    files: Iterable[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    model_max_length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on .txt/.md `files` (files or folders) and save it to `out_dir`.

    Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`; returns the tokenizer.
    Raises `DataError` for unreadable, empty or binary files and for a too-small `vocab_size`.
    """
    check_vocab_size(vocab_size, special_tokens)
    tok = train_tokenizer_from_texts(read_documents(files), vocab_size, special_tokens)
    save_tokenizer(tok, out_dir, model_max_length, special_tokens)
    return tok
