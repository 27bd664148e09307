"""Token shards: documents in, memory-mapped uint16/uint32 token files with a manifest out, in one streaming pass.

Owns the shard layout, the streaming train/validation split, supervised fine-tuning loss masks and
reading shards back (`ShardSplit`). Never trains a tokenizer (bpe.py), never reads user files itself
(sources.py) and never touches a model.

Layout of a shard directory (format "llmos-shards/1"):

    manifest.json      written last, atomically: no manifest means "not prepared" (a crash leaves none)
    train-00000.bin    raw little-endian token ids (dtype in the manifest), at most `shard_tokens` each
    train-00000.mask   (kind "sft" only) one uint8 per token: 1 = a target the loss counts
    val-00000.bin ...

The concatenated files of a split are a slice of one stream; the end-of-text token is at once the end of one
document and the beginning (BOS) of the next, as in GPT-2:

    <eot> doc1 <eot> doc2 ... <eot> docN <eot>

The stream is cut into chunks of `8 * (seq_len + 1)` tokens; chunk c goes to validation iff
`floor((c + 1) * f + 1/2) > floor(c * f + 1/2)` for `f = val_fraction` (Bresenham spacing: about
every 1/f-th chunk, the first near chunk 1/(2f)), so validation samples the whole corpus, and a single
long document splits as well as many short ones. If the stream is too short to reach a validation
chunk, its last `max(seq_len + 1, f * tokens)` tokens go to validation instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from llmos.errors import DataError, InvalidRequestError
from llmos.model.tokenizer import Tokenizer, render_chat_template
from llmos.train.sources import Document, SourceStats, check_processing, collect_data_files, iter_documents

FORMAT = "llmos-shards/1"
MANIFEST = "manifest.json"
KINDS = ("lm", "sft")
CHUNK_WINDOWS = 8  # validation chunks are this many training windows long
_SHARD_FILE = re.compile(r"^(train|val)-\d{5}\.(bin|mask)$")
_ENDOFTEXT = "<|endoftext|>"
_NO_TEMPLATE = ("supervised fine-tuning (--task sft) needs a tokenizer with a chat template: train a new "
                "tokenizer with --chat-tokens, or start from a chat model (--init-from).")


def separator_id(tokenizer: Tokenizer) -> int:
    """The document separator (`eot_id`): `<|endoftext|>` if the vocabulary has it (GPT-2, Qwen and
    llmos tokenizers), else the BOS token (Llama: every document then starts as a prompt does), else
    the EOS token. Raises `DataError` if the tokenizer has none of them."""
    eot = tokenizer.backend.token_to_id(_ENDOFTEXT)
    if eot is not None:
        return eot
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_ids:
        return tokenizer.eos_token_ids[0]
    raise DataError("the tokenizer has no <|endoftext|>, BOS or EOS token to separate documents; use a "
                    "tokenizer that defines bos_token or eos_token in tokenizer_config.json.")


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def prepare_shards(
    paths: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    kind: str = "lm",
    seq_len: int,
    val_fraction: float = 0.05,
    text_field: str = "text",
    messages_field: str = "messages",
    text_column: str = "text",
    label_column: str | None = "label",
    normalize: str = "none",
    clean: bool = False,
    dedup: bool = True,
    shard_tokens: int = 1 << 24,
    progress: bool = True,
    batch_documents: int = 1024,
    batch_chars: int = 1 << 20,
) -> dict:
    """Tokenize the documents of `paths` into token shards in `out_dir` and return the manifest.

    One streaming pass: documents come from `sources.iter_documents` (same options), are tokenized
    in batches (`Tokenizer.encode_batch`, no special tokens added), laid out as in the module
    docstring and appended to the open shard file of their split; a file holds at most
    `shard_tokens` tokens. `kind="lm"`: no masks; chat documents are rendered with the tokenizer's
    chat template (`add_generation_prompt=False`; without a template, "Role: content" lines) and
    trained on in full. `kind="sft"`: see `sft_mask`; text documents (e.g. a folder of .txt mixed in)
    get mask 1 on every token; separators get mask 0.

    Memory is bounded whatever the corpus size: one batch of documents (at most `batch_documents`
    documents or `batch_chars` characters, plus the largest single document, since a .txt file is one
    document) with its token ids (Python ints, about 40 bytes per token), the de-duplication hashes
    (about 100 bytes per unique document), the tokenizer, and at most `8 * (seq_len + 1)` tokens for the
    short-stream validation fallback. Shard files are written through the OS page cache, never held.

    Reuse: if `out_dir` already holds a manifest whose fingerprint (input files' paths, sizes and
    modification times, the tokenizer, every setting above except `progress` and the batch sizes)
    matches and whose files are intact, it is returned without work. Otherwise the directory is
    rebuilt: its old manifest is deleted first, then its shard files; a directory holding other
    files is refused. A failure removes the files written so far.

    Raises `DataError` for bad input (see `sources.iter_documents`), a stream too short for one
    `seq_len + 1` window on each side, a tokenizer without a chat template for `kind="sft"`, a
    conversation without an assistant turn, or a template that breaks the prefix property;
    `InvalidRequestError` for bad settings.
    """
    _check_settings(kind, seq_len, val_fraction, shard_tokens, batch_documents, batch_chars)
    check_processing(normalize)
    if kind == "sft" and not tokenizer.has_chat_template:
        raise DataError(_NO_TEMPLATE)
    out = Path(out_dir)
    files = collect_data_files(paths)
    settings = {"kind": kind, "seq_len": seq_len, "val_fraction": val_fraction, "text_field": text_field,
                "messages_field": messages_field, "text_column": text_column, "label_column": label_column,
                "normalize": normalize, "clean": clean, "dedup": dedup, "shard_tokens": shard_tokens}
    sources = [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
               for f in files]
    tokenizer_sha = hashlib.sha256((tokenizer.backend.to_str() + "\0" + (tokenizer.chat_template or "")
                                    + "\0" + json.dumps(tokenizer.special_tokens, sort_keys=True)).encode()).hexdigest()
    fingerprint = hashlib.sha256(json.dumps({"format": FORMAT, "settings": settings, "sources": sources,
                                             "tokenizer": tokenizer_sha}, sort_keys=True).encode()).hexdigest()
    reused = _reusable(out, fingerprint)
    if reused is not None:
        return reused

    created = not out.exists()
    _clear_shard_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    eot = separator_id(tokenizer)
    dtype = shard_dtype(tokenizer.vocab_size)
    train = _SplitWriter(out, "train", dtype, shard_tokens, masked=kind == "sft")
    val = _SplitWriter(out, "val", dtype, shard_tokens, masked=kind == "sft")
    router = _Router(train, val, CHUNK_WINDOWS * (seq_len + 1), val_fraction)
    stats = SourceStats()
    bar = _Bar(progress, sum(s["bytes"] for s in sources))
    try:
        with bar:
            batch: list[Document] = []
            chars = 0
            for doc in iter_documents(files, text_field=text_field, messages_field=messages_field,
                                      text_column=text_column, label_column=label_column, normalize=normalize,
                                      clean=clean, dedup=dedup, stats=stats):
                batch.append(doc)
                chars += len(doc.text) if doc.text is not None else sum(len(m["content"]) for m in doc.messages)
                if len(batch) >= batch_documents or chars >= batch_chars:
                    _write_batch(batch, tokenizer, kind, eot, router)
                    bar.update(stats, router.pos)
                    batch, chars = [], 0
            if batch:
                _write_batch(batch, tokenizer, kind, eot, router)
            router.write(np.array([eot], dtype=np.int64), np.zeros(1, np.uint8) if kind == "sft" else None)
            bar.update(stats, router.pos)
        _ensure_validation(train, val, seq_len, val_fraction, router.pos)
        train.close()
        val.close()
        manifest = {
            "format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": eot,
            "kind": kind, "seq_len": seq_len, "val_fraction": val_fraction,
            "splits": {"train": train.entries, "val": val.entries},
            "tokens": {"train": train.tokens, "val": val.tokens},
            "documents": stats.documents, "duplicates_removed": stats.duplicates_removed,
            "empty_skipped": stats.empty_skipped, "normalize": normalize, "clean": clean, "dedup": dedup,
            "settings": settings, "sources": sources, "tokenizer_sha256": tokenizer_sha, "fingerprint": fingerprint,
        }
        _write_manifest(out, manifest)
    except BaseException:
        train.close()
        val.close()
        _clear_shard_dir(out)
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return manifest


def sft_mask(tokenizer: Tokenizer, messages: Sequence[dict], source: str = "") -> tuple[list[int], list[int]]:
    """Token ids of one conversation rendered with the chat template, and its loss mask ([tokens] each).

    The mask is 1 exactly on the tokens of assistant turns: for assistant message i, the tokens of
    `render(messages[:i + 1])` beyond those of `render(messages[:i], add_generation_prompt=True)` (the
    content and what the template closes the turn with), cut after the last EOS token in that span
    (so the newline ChatML puts after `<|im_end|>` is not a target). Everything else (system and user
    turns, the generation prompt `<|im_start|>assistant\\n`) is 0. This needs the prefix property:
    each shorter rendering must be a prefix of the longer one in text and in tokens; a template that
    breaks it (e.g. one that rewrites earlier turns) raises `DataError`, as does a conversation without
    an assistant message. One call tokenizes one conversation; `prepare_shards` batches many.
    """
    if not tokenizer.has_chat_template:
        raise DataError(_NO_TEMPLATE)
    texts, turns = _sft_texts(tokenizer, messages, source)
    ids = tokenizer.encode_batch(texts, add_special_tokens=False)
    return _sft_from_ids(ids, turns, set(tokenizer.eos_token_ids), source)


# ---- writing -------------------------------------------------------------------------------------


def _check_settings(kind, seq_len, val_fraction, shard_tokens, batch_documents, batch_chars) -> None:
    if kind not in KINDS:
        raise InvalidRequestError(f"the shard kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    for name, value in (("seq_len", seq_len), ("shard_tokens", shard_tokens), ("batch_documents", batch_documents),
                        ("batch_chars", batch_chars)):
        if not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise InvalidRequestError(f"--val-fraction must be in [0, 1), got {val_fraction!r}.")


def _render(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool, source: str) -> str:
    """The chat template's text for `messages` (may be empty); template errors become `DataError`."""
    if tokenizer.chat_template is None:  # kind "lm" only: the "Role: content" fallback
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    specials = {key: value for key, value in tokenizer.special_tokens.items() if value is not None}
    try:
        return render_chat_template(tokenizer.chat_template, messages=[dict(m) for m in messages],
                                    add_generation_prompt=add_generation_prompt, **specials)
    except InvalidRequestError as err:
        raise DataError(f"{source}: {err}") from None


def _sft_texts(tokenizer: Tokenizer, messages: Sequence[dict], source: str) -> tuple[list[str], list[int]]:
    """Texts to tokenize for one conversation: [full, prefix_1, through_1, prefix_2, ...], and the
    assistant message indices. Checks the text prefix property."""
    full = _render(tokenizer, messages, False, source)
    texts, turns = [full], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True, source)
        through = _render(tokenizer, messages[:i + 1], False, source)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise DataError(
                f"{source}: the chat template is not prefix-consistent at assistant message {i}: the "
                f"conversation rendered up to it (with the generation prompt) is not the start of the "
                f"rendering through it, so the loss mask cannot be computed; use a template that renders "
                f"earlier turns the same way whatever follows (e.g. --chat-tokens for ChatML)."
            )
        texts += [prefix, through]
        turns.append(i)
    if not turns:
        raise DataError(f"{source}: the conversation has no assistant message, so nothing in it is a training "
                        f"target for --task sft; add the assistant's reply or remove the line.")
    return texts, turns


def _sft_from_ids(ids: list[list[int]], turns: list[int], eos: set[int], source: str) -> tuple[list[int], list[int]]:
    full = ids[0]
    mask = [0] * len(full)
    for k, i in enumerate(turns):
        prefix, through = ids[1 + 2 * k], ids[2 + 2 * k]
        a, b = len(prefix), len(through)
        if full[:b] != through or through[:a] != prefix:
            raise DataError(
                f"{source}: at assistant message {i} the tokens of the shorter rendering are not a prefix of "
                f"the longer one (the tokenizer merges text across the turn boundary), so the loss mask "
                f"cannot be computed; use a chat template whose turns start with a special token."
            )
        end = b
        for j in range(b - 1, a - 1, -1):
            if through[j] in eos:
                end = j + 1
                break
        mask[a:end] = [1] * (end - a)
    return full, mask


def _write_batch(batch: list[Document], tokenizer: Tokenizer, kind: str, eot: int, router: _Router) -> None:
    """Tokenize `batch` with one `encode_batch` call and route `<eot> doc` for each document."""
    texts: list[str] = []
    plans: list[tuple[int, list[int] | None]] = []  # (index of the first text, sft turns or None)
    for doc in batch:
        if doc.messages is None:
            plans.append((len(texts), None))
            texts.append(doc.text)
        elif kind == "lm":
            plans.append((len(texts), None))
            texts.append(_render(tokenizer, doc.messages, False, doc.source))
        else:
            doc_texts, turns = _sft_texts(tokenizer, doc.messages, doc.source)
            plans.append((len(texts), turns))
            texts += doc_texts
    ids = tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = set(tokenizer.eos_token_ids)
    tokens: list[int] = []
    masks: list[int] = []
    for doc, (at, turns) in zip(batch, plans):
        tokens.append(eot)
        tokens += ids[at]
        if kind == "sft":
            if turns is None:
                masks += [0] + [1] * len(ids[at])
            else:
                _, mask = _sft_from_ids(ids[at:at + 1 + 2 * len(turns)], turns, eos, doc.source)
                masks += [0] + mask
    router.write(np.asarray(tokens, dtype=np.int64), np.asarray(masks, dtype=np.uint8) if kind == "sft" else None)


class _SplitWriter:
    """Appends tokens (and masks) of one split to `<split>-NNNNN.bin/.mask`, at most `shard_tokens` per file."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, masked: bool):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens, self.masked = shard_tokens, masked
        self.entries: list[dict] = []  # manifest rows: {"file", "tokens", "mask"}
        self._bin = self._mask = None

    @property
    def tokens(self) -> int:
        return sum(e["tokens"] for e in self.entries)

    def write(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        i = 0
        while i < len(tokens):
            if self._bin is None or self.entries[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            n = min(len(tokens) - i, self.shard_tokens - self.entries[-1]["tokens"])
            self._bin.write(tokens[i:i + n].astype(self.dtype).tobytes())
            if self.masked:
                self._mask.write(mask[i:i + n].astype(np.uint8).tobytes())
            self.entries[-1]["tokens"] += n
            i += n

    def _open_next(self) -> None:
        self._close_files()
        name = f"{self.split}-{len(self.entries):05d}"
        self.entries.append({"file": name + ".bin", "tokens": 0, "mask": name + ".mask" if self.masked else None})
        self._bin = open(self.directory / (name + ".bin"), "wb")
        if self.masked:
            self._mask = open(self.directory / (name + ".mask"), "wb")

    def _close_files(self) -> None:
        for f in (self._bin, self._mask):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._bin = self._mask = None

    def close(self) -> None:
        self._close_files()

    def take_tail(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Remove the last `n` tokens (and masks) from this split's files and return them."""
        self._close_files()
        pieces, mask_pieces = [], []
        while n > 0 and self.entries:
            entry = self.entries[-1]
            k = min(n, entry["tokens"])
            keep = entry["tokens"] - k
            path = self.directory / entry["file"]
            pieces.insert(0, np.fromfile(path, self.dtype, count=k, offset=keep * self.dtype.itemsize).astype(np.int64))
            if self.masked:
                mpath = self.directory / entry["mask"]
                mask_pieces.insert(0, np.fromfile(mpath, np.uint8, count=k, offset=keep))
                os.truncate(mpath, keep)
            os.truncate(path, keep * self.dtype.itemsize)
            entry["tokens"] = keep
            n -= k
            if keep == 0:
                path.unlink()
                if self.masked:
                    (self.directory / entry["mask"]).unlink()
                self.entries.pop()
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        return tokens, (np.concatenate(mask_pieces) if self.masked and mask_pieces else None)


class _Router:
    """Cuts the stream into chunks of `chunk` tokens and sends each to train or validation."""

    def __init__(self, train: _SplitWriter, val: _SplitWriter, chunk: int, val_fraction: float):
        self.train, self.val, self.chunk, self.val_fraction = train, val, chunk, val_fraction
        self.pos = 0  # tokens of the stream routed so far

    def is_val(self, c: int) -> bool:
        f = self.val_fraction
        return f > 0 and math.floor((c + 1) * f + 0.5) > math.floor(c * f + 0.5)

    def write(self, tokens: np.ndarray, mask: np.ndarray | None) -> None:
        i = 0
        while i < len(tokens):
            c = self.pos // self.chunk
            n = min(len(tokens) - i, (c + 1) * self.chunk - self.pos)
            target = self.val if self.is_val(c) else self.train
            target.write(tokens[i:i + n], None if mask is None else mask[i:i + n])
            self.pos += n
            i += n


def _ensure_validation(train: _SplitWriter, val: _SplitWriter, seq_len: int, val_fraction: float, total: int) -> None:
    """The short-stream fallback (module docstring), then `DataError` if a split is under one window."""
    window = seq_len + 1
    if val_fraction > 0 and val.tokens < window:
        need = max(window, int(total * val_fraction)) - val.tokens
        if train.tokens - need >= window:
            tokens, mask = train.take_tail(need)
            val.write(tokens, mask)
    if train.tokens < window or (val_fraction > 0 and val.tokens < window):
        need = window if val_fraction <= 0 else int(window / min(val_fraction, 1 - val_fraction)) + window
        raise DataError(
            f"the data is too short: {total} tokens, but --seq-len {seq_len} with a validation fraction of "
            f"{val_fraction} needs at least about {need}; add text or lower --seq-len."
        )


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)


def _clear_shard_dir(out: Path) -> None:
    """Delete a shard directory's manifest (first) and shard files; refuse a directory of other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out} is a file, not a shard directory; pass --shards-dir a new or empty directory.")
    entries = list(out.iterdir())
    foreign = [p.name for p in entries if not (p.name == MANIFEST or _SHARD_FILE.match(p.name)
                                              or p.name.startswith(f".{MANIFEST}.tmp-"))]
    if foreign:
        raise DataError(f"{out} holds files that are not token shards ({', '.join(sorted(foreign)[:5])}); "
                        f"refusing to overwrite them. Pass a new or empty directory for the shards.")
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on a crash leaves no manifest
    for p in entries:
        p.unlink(missing_ok=True)


def _reusable(out: Path, fingerprint: str) -> dict | None:
    """The manifest in `out` if it matches `fingerprint` and its files are intact, else None."""
    try:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            return None
        _check_files(out, manifest)
    except DataError:
        return None
    return manifest


# ---- reading -------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a prepared shard directory. Raises `DataError` if it is missing, corrupt or of another format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} holds no prepared token shards (no {MANIFEST}; an interrupted preparation "
                        f"leaves none); prepare them again, e.g. by running `llmos train` with --data.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is corrupt ({err}); delete {directory} and prepare the shards again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not an {FORMAT} manifest; delete {directory} and prepare the shards again.")
    return manifest


def _check_files(directory: Path, manifest: dict) -> None:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for entries in manifest["splits"].values():
        for entry in entries:
            expected = [(entry["file"], entry["tokens"] * itemsize)]
            if entry.get("mask"):
                expected.append((entry["mask"], entry["tokens"]))
            for name, size in expected:
                path = directory / name
                if not path.is_file() or path.stat().st_size != size:
                    raise DataError(f"{path} is missing or truncated (expected {size} bytes); delete {directory} "
                                    f"and prepare the shards again.")


class ShardSplit:
    """One split ("train" or "val") of a prepared shard directory, read through memory maps.

    `len(split)` is its number of tokens; `window(start, length)` returns
    `(tokens: np.ndarray[int64] [length], mask: np.ndarray[bool] [length] | None)`, crossing shard
    files transparently and copying only the window. `mask` is None for kind "lm". Loss semantics:
    inputs `w[:-1]`, targets `w[1:]`; target j counts iff `mask[j + 1]`.
    Raises `DataError` for a missing/corrupt manifest or missing/truncated shard files.
    """

    def __init__(self, directory: str | Path, split: str):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.directory} has no {split!r} split (it has "
                            f"{', '.join(self.manifest['splits'])}).")
        _check_files(self.directory, self.manifest)
        self.split = split
        self.kind = self.manifest["kind"]
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.eot_id = self.manifest["eot_id"]
        entries = [e for e in self.manifest["splits"][split] if e["tokens"] > 0]
        self._tokens = [np.memmap(self.directory / e["file"], self.dtype, mode="r", shape=(e["tokens"],))
                        for e in entries]
        self._masks = ([np.memmap(self.directory / e["mask"], np.uint8, mode="r", shape=(e["tokens"],))
                        for e in entries] if self.kind == "sft" else None)
        self._starts = np.cumsum([0] + [e["tokens"] for e in entries])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens `[start, start + length)` of the split as int64 (and the mask as bool, or None)."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) is outside the {self.split} split "
                             f"of {len(self)} tokens")
        tokens = np.empty(length, np.int64)
        mask = np.empty(length, np.bool_) if self._masks is not None else None
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[i])
            n = min(length - done, len(self._tokens[i]) - offset)
            tokens[done:done + n] = self._tokens[i][offset:offset + n]
            if mask is not None:
                mask[done:done + n] = self._masks[i][offset:offset + n]
            done += n
            i += 1
        return tokens, mask


class _Bar:
    """A rich progress bar over input bytes (files finished), with document and token counts; or nothing."""

    def __init__(self, enabled: bool, total_bytes: int):
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]data"), BarColumn(), DownloadColumn(),
                                      TextColumn("{task.fields[docs]:,} docs, {task.fields[tokens]:,} tokens"),
                                      TimeElapsedColumn(), console=Console(stderr=True))
            self._task = self._progress.add_task("data", total=total_bytes, docs=0, tokens=0)

    def __enter__(self):
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, stats: SourceStats, tokens: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=stats.bytes_read, docs=stats.documents, tokens=tokens)
