"""Training documents from the user's files: .txt/.md, JSONL (text or chat messages) and CSV, streamed.

Owns finding, reading, validating, normalizing, cleaning and de-duplicating documents. Never
tokenizes (bpe.py, shards.py) and never holds more than one document (one .txt file, one JSONL line,
one CSV row) plus the de-duplication hashes in memory.

Formats (a folder is searched recursively, hidden files and folders skipped, files in sorted order):
- `.txt`, `.md` (and any file named explicitly with another suffix): one document per file.
- `.jsonl` / `.ndjson`: one JSON object per line; blank lines are skipped. The document is the
  `messages_field` list of `{"role", "content"}` chat messages if the object has that key, else the
  string in `text_field`. A `label_column` key, if present, becomes the document's label.
- `.csv`: a header row, then one document per row from `text_column`; `label_column`, if the header
  has it, becomes the label. Read with the `csv` module (RFC 4180 quoting, newlines inside quoted
  fields, a UTF-8 BOM is ignored).

Optional processing, applied to every text and every message content, in this order:
- `normalize`: "none" (default: the text as written), "nfc" (canonical composition: "e" + U+0301 ->
  "é"; never changes how text looks) or "nfkc" (compatibility composition as well: "ﬁ" -> "fi",
  "²" -> "2", full-width "Ａ" -> "A"; changes some characters' meaning).
- `clean` (off by default): (1) "\\r\\n" and lone "\\r" become "\\n"; (2) control characters
  (Unicode category Cc) other than "\\t" and "\\n", and U+FEFF (byte order mark / zero-width no-break
  space), are deleted; (3) lines holding only spaces or tabs become empty; (4) runs of two or more
  blank lines collapse to one blank line. Nothing else changes (no trimming of line ends, no case or
  punctuation changes).
- `dedup` (on by default): a document whose processed text (for chat documents: the canonical JSON
  of its messages) has the same BLAKE2b-128 hash as an earlier document is dropped. The hashes cost
  about 100 bytes of memory per unique document (a 16-byte digest in a Python set), e.g. ~1 GB for
  10 million documents.

A document that is empty (or whitespace only) after processing is skipped and counted; a file that is
empty is an error, and so is a corpus where every document is empty.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from llmos.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
DATA_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES
NORMALIZATIONS = ("none", "nfc", "nfkc")
CHAT_ROLES = ("system", "user", "assistant", "tool")
BINARY_PROBE_BYTES = 8192  # a file with a NUL byte in its first 8 KiB is taken as binary

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")  # Cc minus \t \n (\r is gone by then), and BOM
_BLANK_LINES = re.compile(r"(?m)^[ \t]+$")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Document:
    """One training document: plain `text`, or chat `messages` ([{"role", "content"}, ...]), never both.

    `label` is the CSV label column / JSONL label key (a string) or None; `source` names where it came
    from ("path" for a whole file, "path:line" for a JSONL line or CSV row) for error messages.
    """

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    label: str | None = None
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass
class SourceStats:
    """Counters `iter_documents` fills in while it streams (read them after the iteration ends).

    `files`: every file read, in order; `documents`: documents yielded; `duplicates_removed`: exact
    duplicates dropped; `empty_skipped`: documents empty after processing; `bytes_read`: sizes of the
    files finished so far (bytes).
    """

    files: list[str] = field(default_factory=list)
    documents: int = 0
    duplicates_removed: int = 0
    empty_skipped: int = 0
    bytes_read: int = 0


def collect_data_files(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """Expand files and folders into a list of data files (folders: .txt/.md/.jsonl/.ndjson/.csv, sorted).

    A file named explicitly is taken whatever its suffix (an unknown suffix reads as plain text).
    Raises `DataError` if no path is given, a path does not exist, or a folder holds no data file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no training data given; pass --data FILE_OR_FOLDER (.txt, .md, .jsonl or .csv).")
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in DATA_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"{p} contains no .txt, .md, .jsonl or .csv files; put training data in it.")
            out.extend(found)
        else:
            raise DataError(f"{p} does not exist; pass --data an existing file (.txt, .md, .jsonl, .csv) "
                            f"or a folder of them.")
    return out


def process_text(text: str, normalize: str = "none", clean: bool = False) -> str:
    """`text` after the optional Unicode normalization and cleaning described in the module docstring."""
    if normalize != "none":
        text = unicodedata.normalize(normalize.upper(), text)
    if clean:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        text = _BLANK_LINES.sub("", text)
        text = _BLANK_RUNS.sub("\n\n", text)
    return text


def check_processing(normalize: str) -> None:
    """Raise `DataError` for an unknown `normalize` value."""
    if normalize not in NORMALIZATIONS:
        raise DataError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}.")


def iter_documents(
    paths: Iterable[str | Path] | str | Path,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    text_column: str = "text",
    label_column: str | None = "label",
    require_label: bool = False,
    normalize: str = "none",
    clean: bool = False,
    dedup: bool = True,
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Stream the documents of `paths` (files and folders; formats in the module docstring).

    Files are opened one at a time and read line by line (a .txt/.md file whole), so memory holds one
    document plus the de-duplication hashes (~100 bytes per unique document when `dedup`). With
    `require_label`, every CSV must have `label_column`, every JSONL object must have that key, and
    plain-text files are refused.
    `stats` (optional) is filled in as documents stream.

    Raises `DataError` naming the file (and line) for: a missing path, an empty, binary (NUL bytes) or
    non-UTF-8 file, a JSONL line that is not a JSON object or lacks both fields, a field of the wrong
    type, chat messages of the wrong shape or with a role outside system/user/assistant/tool, a CSV
    without the text (or required label) column (the message lists the columns it has), a malformed
    CSV row, an unknown `normalize`, and a corpus whose documents are all empty.
    """
    check_processing(normalize)
    files = collect_data_files(paths)
    stats = stats if stats is not None else SourceStats()
    seen: set[bytes] = set()
    for path in files:
        stats.files.append(str(path))
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            raw_docs = _read_jsonl(path, text_field, messages_field, label_column, require_label)
        elif suffix in CSV_SUFFIXES:
            raw_docs = _read_csv(path, text_column, label_column, require_label)
        elif require_label:
            raise DataError(f"{path} is a plain-text file, which has no {label_column!r} label; labelled data "
                            f"is a .csv with a {label_column!r} column or .jsonl lines with a {label_column!r} key.")
        else:
            raw_docs = iter([Document(text=read_text_file(path), source=str(path))])
        for doc in raw_docs:
            doc = _process(doc, normalize, clean)
            if doc is None:
                stats.empty_skipped += 1
                continue
            if dedup:
                key = _doc_hash(doc)
                if key in seen:
                    stats.duplicates_removed += 1
                    continue
                seen.add(key)
            stats.documents += 1
            yield doc
        stats.bytes_read += path.stat().st_size
    if stats.documents == 0:
        what = f"all {stats.empty_skipped} documents are" if stats.empty_skipped else "there are no documents"
        raise DataError(f"no training text in {', '.join(map(str, files))}: {what} empty"
                        f"{' after cleaning' if clean else ''}; check --text-field/--text-column and the files.")


# ---- one file per format ------------------------------------------------------------------------


def _probe(path: Path) -> None:
    """Raise `DataError` if `path` is empty or binary (a NUL byte in its first 8 KiB)."""
    with path.open("rb") as f:
        head = f.read(BINARY_PROBE_BYTES)
    if not head.strip() and path.stat().st_size <= len(head):
        raise DataError(f"{path} is empty; remove it from --data or put text in it.")
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (it contains NUL bytes); train on text files only "
                        f"(.txt, .md, .jsonl, .csv).")


def _not_utf8(where: str, path: Path, err: UnicodeDecodeError, raw: bytes) -> DataError:
    return DataError(
        f"{where} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r}); convert the file "
        f"first, e.g. `iconv -f latin1 -t utf-8 {path}`, or remove it from --data."
    )


def read_text_file(path: str | Path) -> str:
    """One .txt/.md file's text (a leading BOM removed). Raises `DataError` for empty, binary or non-UTF-8 files."""
    path = Path(path)
    _probe(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(str(path), path, e, raw) from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise DataError(f"{path} is empty; remove it from --data or put text in it.")
    return text


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text with its line ending) of `path`; the BOM stripped; `DataError` on bad UTF-8."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path} line {lineno}", path, e, raw) from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            yield lineno, line


def _read_jsonl(path: Path, text_field: str, messages_field: str, label_column: str | None,
                require_label: bool) -> Iterator[Document]:
    _probe(path)
    any_line = False
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        any_line = True
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                            f"file must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where} holds a JSON {type(obj).__name__}, not an object such as "
                            f'{{"{text_field}": "..."}}.')
        label = None
        if label_column is not None and label_column in obj:
            label = obj[label_column] if isinstance(obj[label_column], str) else json.dumps(obj[label_column])
        elif require_label:
            raise DataError(f"{where} has no {label_column!r} key (keys: {', '.join(map(repr, obj)) or 'none'}); "
                            f"pass --label-column NAME.")
        if messages_field in obj:
            yield Document(messages=_check_messages(obj[messages_field], where, messages_field),
                           label=label, source=where)
        elif text_field in obj:
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: {text_field!r} must be a string, got {type(text).__name__}.")
            if _SURROGATE.search(text):
                raise DataError(f"{where}: {text_field!r} holds a lone surrogate escape (e.g. \\ud800), which is "
                                f"not valid Unicode; fix the line.")
            yield Document(text=text, label=label, source=where)
        else:
            raise DataError(
                f"{where} has neither a {text_field!r} nor a {messages_field!r} key (keys: "
                f"{', '.join(map(repr, obj)) or 'none'}); pass --text-field NAME or --messages-field NAME."
            )
    if not any_line:
        raise DataError(f"{path} is empty; remove it from --data or put JSON lines in it.")


def _check_messages(messages, where: str, messages_field: str) -> tuple[dict, ...]:
    """Validated chat messages as ({"role", "content"}, ...): `DataError` naming the line and message."""
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {messages_field!r} must be a non-empty list of messages like {example}.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', got "
                            f"{json.dumps(m, ensure_ascii=False)[:200]}; messages look like {example}.")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}.")
        if _SURROGATE.search(m["content"]):
            raise DataError(f"{where}: message {i} holds a lone surrogate escape (e.g. \\ud800), which is not "
                            f"valid Unicode; fix the line.")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _read_csv(path: Path, text_column: str, label_column: str | None, require_label: bool) -> Iterator[Document]:
    _probe(path)
    csv.field_size_limit(2**31 - 1)  # documents can be long; the default limit is 128 KiB per field
    position = {"line": 0}

    def lines() -> Iterator[str]:
        for lineno, line in _decoded_lines(path):
            position["line"] = lineno
            yield line

    reader = csv.reader(lines())
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path} is empty; a .csv file needs a header row naming its columns "
                            f"(e.g. `{text_column},label`).")
        columns = [h.strip() for h in header]
        if text_column not in columns:
            raise DataError(f"{path} has no column {text_column!r}; its columns are "
                            f"{', '.join(map(repr, columns))}. Pass --text-column NAME.")
        text_at = columns.index(text_column)
        label_at = columns.index(label_column) if label_column is not None and label_column in columns else None
        if require_label and label_at is None:
            raise DataError(f"{path} has no column {label_column!r}; its columns are "
                            f"{', '.join(map(repr, columns))}. Pass --label-column NAME.")
        rows = 0
        need = max(text_at, -1 if label_at is None else label_at) + 1
        while True:
            start = position["line"] + 1  # a quoted field may span lines: name the row's first line
            row = next(reader, None)
            if row is None:
                break
            if not row:  # a blank line
                continue
            rows += 1
            if len(row) < need:
                raise DataError(f"{path}:{start}: the row has {len(row)} field(s) but the header has "
                                f"{len(columns)}; quote fields that contain commas or newlines.")
            yield Document(text=row[text_at], label=None if label_at is None else row[label_at],
                           source=f"{path}:{start}")
        if rows == 0:
            raise DataError(f"{path} has a header but no rows; put data in it or remove it from --data.")
    except csv.Error as e:
        raise DataError(f"{path}:{position['line']} is not valid CSV ({e}).") from None


# ---- processing ----------------------------------------------------------------------------------


def _process(doc: Document, normalize: str, clean: bool) -> Document | None:
    """`doc` normalized and cleaned, or None if nothing but whitespace is left."""
    if doc.messages is not None:
        messages = tuple({"role": m["role"], "content": process_text(m["content"], normalize, clean)}
                         for m in doc.messages)
        if not any(m["content"].strip() for m in messages):
            return None
        return Document(messages=messages, label=doc.label, source=doc.source)
    text = process_text(doc.text, normalize, clean)
    if not text.strip():
        return None
    return Document(text=text, label=doc.label, source=doc.source)


def _doc_hash(doc: Document) -> bytes:
    """BLAKE2b-128 of the document's text, or of its messages' canonical JSON (kept apart by a prefix)."""
    if doc.messages is not None:
        payload = "m" + json.dumps(doc.messages, ensure_ascii=False, separators=(",", ":"))
    else:
        payload = "t" + doc.text
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).digest()
