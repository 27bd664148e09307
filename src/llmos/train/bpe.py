"""Byte-level BPE tokenizer training with the Hugging Face `tokenizers` library, or reuse of a tokenizer.json.

Owns the tokenizer recipe (GPT-2 style byte-level BPE), the optional chat tokens and ChatML template,
and the files a tokenizer is saved as. Never implements BPE itself and never reads files itself
(documents stream in from `llmos.train.sources`).

Decisions, so that a checkpoint reads the same everywhere:
- The first special token (default `<|endoftext|>`, id 0) is both BOS and EOS, as in GPT-2; the
  training stream puts it between documents (see `llmos.train.shards`).
- `encode(text)` with special tokens on *prepends* it (a `TemplateProcessing` post-processor, like
  Llama's BOS): a prompt then starts the way every training document started. `add_special_tokens=False`
  gives the bare text tokens. No EOS is appended.
- With chat tokens, `<|im_start|>` and `<|im_end|>` follow as special tokens (ids 1 and 2),
  tokenizer_config.json carries the ChatML `chat_template` (`CHATML_TEMPLATE`) and names `<|im_end|>`
  as the EOS token, so a chat model stops at the end of its turn; BOS stays `<|endoftext|>`.
- tokenizer_config.json names `PreTrainedTokenizerFast`, so `transformers.AutoTokenizer` loads
  tokenizer.json as is and renders the same chat template as `llmos.model.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmos.errors import DataError, ModelLoadError
from llmos.model.tokenizer import Tokenizer as LlmosTokenizer
from llmos.train.sources import Document, iter_documents

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
NUM_BYTES = 256
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML (OpenAI; as in Qwen2): "<|im_start|>role\ncontent<|im_end|>\n" per message, then
# "<|im_start|>assistant\n" with add_generation_prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def special_tokens_for(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, chat_tokens: bool = False) -> list[str]:
    """The special tokens of a new tokenizer: `special_tokens`, then the chat tokens if asked and missing."""
    out = list(special_tokens)
    if chat_tokens:
        out += [t for t in CHAT_TOKENS if t not in out]
    return out


def min_vocab_size(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> int:
    """Smallest vocabulary a byte-level BPE can have: the 256 byte tokens plus the special tokens."""
    return NUM_BYTES + len(special_tokens)


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> None:
    """Raise `DataError` unless `vocab_size` holds the 256 bytes and the special tokens."""
    if not special_tokens:
        raise DataError("a tokenizer needs at least one special token (the end-of-text token).")
    if not isinstance(vocab_size, int) or vocab_size < min_vocab_size(special_tokens):
        raise DataError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{min_vocab_size(special_tokens)} (256 bytes + {len(special_tokens)} special token(s): "
            f"{', '.join(special_tokens)}); "
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


def tokenizer_config(special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, model_max_length: int | None = None,
                     chat_template: str | None = None) -> dict:
    """The tokenizer_config.json of a byte-level BPE made here (see the module docstring's decisions)."""
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
    if chat_template is not None:
        config["chat_template"] = chat_template
        if CHAT_TOKENS[1] in special_tokens:
            config["eos_token"] = CHAT_TOKENS[1]
    return config


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int | None = None,
                   special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, *, chat_template: str | None = None) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, each atomically,
    so that `transformers.AutoTokenizer` and `llmos.model.tokenizer.Tokenizer` load them.

    With `chat_template` (e.g. `CHATML_TEMPLATE`), the template goes into tokenizer_config.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config(special_tokens, model_max_length, chat_template)
    tmp = out_dir / f".tokenizer.json.tmp-{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, out_dir / "tokenizer.json")
    _write_atomic(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    specials = {key: config[key] for key in ("bos_token", "eos_token", "pad_token")}
    _write_atomic(out_dir / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def document_texts(documents: Iterable[Document]) -> Iterator[str]:
    """The texts a tokenizer learns from: each text document, and each chat message's content.

    Chat documents are not rendered through a template here: the BPE trainer would otherwise count
    the template's markup (e.g. "<|im_start|>") as ordinary text.
    """
    for doc in documents:
        if doc.messages is not None:
            for message in doc.messages:
                yield message["role"]
                yield message["content"]
        else:
            yield doc.text


def train_tokenizer(
    files: Iterable[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    model_max_length: int | None = None,
    *,
    chat_tokens: bool = False,
    **source_options,
) -> Tokenizer:
    """Train a byte-level BPE on the documents of `files` (files or folders; any format of
    `llmos.train.sources`, read with `source_options` such as `text_field`, `normalize`, `clean`,
    `dedup`) and save it to `out_dir` (`save_tokenizer`); returns the `tokenizers.Tokenizer`.

    Documents stream from disk into `Tokenizer.train_from_iterator`: memory holds the BPE trainer's
    word counts (one entry per distinct pre-token, not the corpus) and one document at a time.
    With `chat_tokens`, `CHAT_TOKENS` are added after `special_tokens` and `CHATML_TEMPLATE` is saved.
    Raises `DataError` for unreadable, empty or binary data (see `sources.iter_documents`) and for a
    `vocab_size` below `min_vocab_size` of the special tokens.
    """
    special_tokens = special_tokens_for(special_tokens, chat_tokens)
    check_vocab_size(vocab_size, special_tokens)
    documents = iter_documents(files, **source_options)
    tok = train_tokenizer_from_texts(document_texts(documents), vocab_size, special_tokens)
    save_tokenizer(tok, out_dir, model_max_length, special_tokens,
                   chat_template=CHATML_TEMPLATE if chat_tokens else None)
    return tok


def load_tokenizer(path: str | Path, *, chat_tokens: bool = False) -> LlmosTokenizer:
    """Reuse an existing tokenizer: a model or tokenizer directory, or a `tokenizer.json` file.

    With `chat_tokens` and a tokenizer without a chat template, `<|im_start|>`/`<|im_end|>` are added
    as special tokens where missing (the vocabulary grows by up to 2, so only for a model trained from
    scratch) and the ChatML template is set; a tokenizer that has a template keeps it. Raises
    `DataError` if there is no tokenizer.json or it cannot be read.
    """
    path = Path(path)
    directory = path.parent if path.is_file() and path.name.endswith(".json") else path
    if not (directory / "tokenizer.json").is_file():
        raise DataError(f"{path} has no tokenizer.json; pass --tokenizer a model or tokenizer directory "
                        f"(or its tokenizer.json).")
    try:
        tokenizer = LlmosTokenizer.from_dir(directory)
    except ModelLoadError as err:
        raise DataError(str(err)) from err
    if chat_tokens and not tokenizer.has_chat_template:
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        backend = tokenizer.backend
        missing = [t for t in CHAT_TOKENS if backend.token_to_id(t) is None]
        if missing:
            from tokenizers import AddedToken

            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        extra = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = extra + [t for t in CHAT_TOKENS if t not in extra]
        config["chat_template"] = CHATML_TEMPLATE
        config["eos_token"] = CHAT_TOKENS[1]
        tokenizer = LlmosTokenizer(backend, config)
    return tokenizer


def prepare_tokenizer(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int,
    tokenizer: str | Path | None = None,
    chat_tokens: bool = False,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    model_max_length: int | None = None,
    **source_options,
) -> LlmosTokenizer:
    """The tokenizer of a run, saved in `out_dir` and returned as a `llmos.model.tokenizer.Tokenizer`.

    With `tokenizer` (a directory or tokenizer.json), that tokenizer is reused (`load_tokenizer`) and
    `vocab_size` is ignored; otherwise a byte-level BPE of `vocab_size` is trained on `paths`
    (`train_tokenizer`, streaming; `source_options` as in `sources.iter_documents`). Raises `DataError`
    as those functions do.
    """
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, chat_tokens=chat_tokens)
        tok.save(out_dir)
        return tok
    train_tokenizer(paths, vocab_size, out_dir, special_tokens, model_max_length, chat_tokens=chat_tokens,
                    **source_options)
    return LlmosTokenizer.from_dir(out_dir)
