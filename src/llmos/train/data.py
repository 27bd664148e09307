"""Training data held in memory: text files in, a packed token stream and random [batch, seq_len + 1] windows out.

Owns the in-memory path (the whole corpus as one array) that the original trainer uses. The streaming
path for any corpus size is `llmos.train.sources` (documents) and `llmos.train.shards` (token shards
on disk, same stream layout). Never trains a tokenizer (bpe.py) and never touches a model.

Stream layout (the documented separator): every document (one file) is preceded by the
end-of-text token, and the stream ends with one:

    <|endoftext|> doc1 <|endoftext|> doc2 ... <|endoftext|> docN <|endoftext|>

so the token is at once the end of one document and the beginning (BOS) of the next, as in GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from llmos.errors import DataError
from llmos.train.sources import read_text_file

TEXT_SUFFIXES = (".txt", ".md")


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted list of .txt/.md files.

    Folders are searched recursively (hidden files and folders skipped); a file named explicitly is
    taken whatever its suffix. Raises `DataError` if a path does not exist or nothing is found.
    """
    out: list[Path] = []
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no training data given; pass --data FILE_OR_FOLDER (.txt or .md files).")
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"{p} contains no .txt or .md files; put plain-text training data in it.")
            out.extend(found)
        else:
            raise DataError(f"{p} does not exist; pass --data an existing .txt/.md file or a folder of them.")
    return out


def read_document(path: str | Path) -> str:
    """One file's text. Raises `DataError` for empty, binary or non-UTF-8 files (see `sources.read_text_file`)."""
    return read_text_file(path)


def read_documents(paths: Iterable[str | Path]) -> list[str]:
    """Texts of every .txt/.md file under `paths` (see `collect_files`), one document per file."""
    return [read_document(f) for f in collect_files(paths)]


def pack_documents(docs: Sequence[str], tokenizer, eot_id: int) -> np.ndarray:
    """Tokenize `docs` and pack them into one flat stream `[num_tokens]` (layout in the module docstring).

    `tokenizer` is a `tokenizers.Tokenizer`. The dtype is uint16 when the vocabulary fits, else uint32.
    """
    encodings = tokenizer.encode_batch(list(docs), add_special_tokens=False)
    n = sum(len(e.ids) for e in encodings) + len(encodings) + 1
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    stream = np.empty(n, dtype=dtype)
    i = 0
    for e in encodings:
        stream[i] = eot_id
        stream[i + 1:i + 1 + len(e.ids)] = e.ids
        i += 1 + len(e.ids)
    stream[i] = eot_id
    return stream


@dataclass
class TokenSplit:
    train: np.ndarray  # [num_train_tokens]
    val: np.ndarray  # [num_val_tokens]; empty when val_fraction == 0


def split_train_val(tokens: np.ndarray, val_fraction: float, seq_len: int) -> TokenSplit:
    """Split the stream into train and validation tokens.

    The stream is cut into chunks of `8 * (seq_len + 1)` tokens and `round(num_chunks * val_fraction)`
    chunks, evenly spaced through the stream, go to validation, so validation samples the whole corpus
    rather than only its end. A stream too short for that gives its last `val_fraction` (at least one
    window) to validation. Raises `DataError` if either side is shorter than one window.
    """
    window = seq_len + 1
    chunk = 8 * window
    num_chunks = len(tokens) // chunk
    num_val = round(num_chunks * val_fraction)
    if val_fraction <= 0:
        split = TokenSplit(tokens, tokens[:0])
    elif num_val >= 1:
        val_idx = set(np.linspace(0, num_chunks - 1, num_val + 2)[1:-1].round().astype(int).tolist())
        bounds = [i * chunk for i in range(num_chunks)] + [len(tokens)]
        parts = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        split = TokenSplit(
            np.concatenate([c for i, c in enumerate(parts) if i not in val_idx]),
            np.concatenate([c for i, c in enumerate(parts) if i in val_idx]),
        )
    else:
        n_val = max(window, int(len(tokens) * val_fraction))
        split = TokenSplit(tokens[:-n_val], tokens[-n_val:])
    if len(split.train) < window or (val_fraction > 0 and len(split.val) < window):
        need = window if val_fraction <= 0 else int(window / min(val_fraction, 1 - val_fraction)) + window
        raise DataError(
            f"the data is too short: {len(tokens)} tokens, but --seq-len {seq_len} with a validation "
            f"fraction of {val_fraction} needs at least about {need}; add text or lower --seq-len."
        )
    return split


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len + 1` tokens at uniformly random offsets: LongTensor `[batch, seq_len + 1]`.

    Inputs are `batch[:, :-1]`, targets `batch[:, 1:]`. The same `rng` state gives the same batch.
    """
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows)
