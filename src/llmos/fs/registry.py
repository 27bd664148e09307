"""The model registry: short names for checkpoint directories, kept in LLMOS_HOME/llmos.db (SQLite).

Owns the `models` table and how a `--model` argument becomes a directory. Never loads weights
(it reads config.json only) and never creates LLMOS_HOME just to read it.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmos.errors import LlmosError, ModelLoadError
from llmos.fs import db as sqlite_db

DEFAULT_MODEL_NAME = "default"
DB_FILE = "llmos.db"
SCHEMA = "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, path TEXT NOT NULL, added_at TEXT NOT NULL)"
NAME_PATTERN = re.compile(r"[\w][\w.:/-]{0,99}")


class RegistryError(LlmosError):
    """LLMOS_HOME or its database cannot be read or written, or a registry request is invalid."""


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its `name`, checkpoint directory `path`, and `added_at` (ISO 8601, UTC)."""

    name: str
    path: Path
    added_at: str


def llmos_home() -> Path:
    """$LLMOS_HOME, or ~/.llmos when it is unset or empty."""
    return Path(os.environ.get("LLMOS_HOME") or "~/.llmos").expanduser()


def db_path() -> Path:
    return llmos_home() / DB_FILE


def default_model_dir() -> Path:
    """The bundled default model: `llmos/assets/default-model` inside the installed package."""
    return Path(str(importlib.resources.files("llmos") / "assets" / "default-model"))


# ---- resolution ------------------------------------------------------------------------------


def resolve_model(name_or_dir: str | None) -> Path:
    """The checkpoint directory for a `--model` argument.

    None or "default" -> the bundled default model; an existing directory -> itself (absolute);
    a registered name -> its path. Raises `ModelLoadError` when nothing matches, when the bundled
    model is not installed, or when a registered model's directory has vanished; `RegistryError`
    when the database is unreadable.
    """
    if name_or_dir is not None:
        as_dir = Path(name_or_dir).expanduser()
        if as_dir.is_dir():
            return as_dir.resolve()
    if name_or_dir is None or name_or_dir == DEFAULT_MODEL_NAME:
        return _bundled_default()
    entry = get_model(name_or_dir)
    if entry is None and _looks_like_path(name_or_dir):
        raise ModelLoadError(
            f"model directory {name_or_dir} does not exist (nor is it a registered name); pass --model an "
            "existing Hugging Face checkpoint directory or a registered name (`llmos models` lists them).")
    if entry is None:
        raise ModelLoadError(
            f"no registered model named {name_or_dir!r} and no directory of that name here; pass --model a "
            f"checkpoint directory, or register one with `llmos models add DIR --name {name_or_dir}` "
            "(`llmos models` lists the registered ones).")
    if not entry.path.is_dir():
        raise ModelLoadError(
            f"model {entry.name!r} is registered at {entry.path}, but that directory no longer exists; "
            f"restore it, or unregister it with `llmos models rm {entry.name}`.")
    return entry.path


def _looks_like_path(arg: str) -> bool:
    return arg.startswith((".", "~", os.sep)) or arg.endswith(os.sep)


def _bundled_default() -> Path:
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the bundled default model is not installed (looked in {path}); pass --model a checkpoint "
            "directory or a registered name (`llmos models` lists them).")
    return path


# ---- the models table ----------------------------------------------------------------------


def list_models() -> list[ModelEntry]:
    """Every registered model, by name. Empty when the database does not exist yet."""
    rows = _read("SELECT name, path, added_at FROM models ORDER BY name")
    return [ModelEntry(name, Path(path), added_at) for name, path, added_at in rows]


def get_model(name: str) -> ModelEntry | None:
    """The registered model `name`, or None."""
    rows = _read("SELECT name, path, added_at FROM models WHERE name = ?", (name,))
    return ModelEntry(rows[0][0], Path(rows[0][1]), rows[0][2]) if rows else None


def add_model(path: str | Path, name: str | None = None) -> ModelEntry:
    """Register the checkpoint directory `path` as `name` (default: the directory's name).

    The directory must exist and hold a config.json llmos supports. Raises `ModelLoadError` /
    `UnsupportedModelError` for a bad directory, `RegistryError` for a bad or taken name.
    """
    from llmos.model.config import ModelConfig  # no torch; keeps the registry importable cheaply

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelLoadError(f"{str(path)!r} is not a directory; give the path of a Hugging Face checkpoint "
                             "directory (config.json, model.safetensors, tokenizer.json).")
    directory = directory.resolve()
    ModelConfig.from_dir(directory)
    name = _check_name(directory.name if name is None else name)
    with _transaction() as conn:
        taken = conn.execute("SELECT path FROM models WHERE name = ?", (name,)).fetchone()
        if taken:
            raise RegistryError(f"a model named {name!r} is already registered ({taken[0]}); pick another name "
                                f"with --name, or remove it first with `llmos models rm {name}`.")
        added_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        conn.execute("INSERT INTO models (name, path, added_at) VALUES (?, ?, ?)", (name, str(directory), added_at))
    return ModelEntry(name, directory, added_at)


def remove_model(name: str) -> ModelEntry:
    """Unregister `name` (its files are left alone). Raises `RegistryError` if no such model."""
    if name == DEFAULT_MODEL_NAME:
        raise RegistryError(f"{DEFAULT_MODEL_NAME!r} is the bundled model, which ships with llmos and is not in the "
                            "registry; nothing to remove.")
    with _transaction() as conn:
        row = conn.execute("SELECT name, path, added_at FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RegistryError(f"no registered model named {name!r}; `llmos models` lists them.")
        conn.execute("DELETE FROM models WHERE name = ?", (name,))
    return ModelEntry(row[0], Path(row[1]), row[2])


def _check_name(name: str) -> str:
    if name == DEFAULT_MODEL_NAME:
        raise RegistryError(f"{DEFAULT_MODEL_NAME!r} is reserved for the bundled model; pick another --name.")
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: use up to 100 letters, digits and . _ - : / "
                            "starting with a letter or digit, e.g. --name qwen2.5-0.5b.")
    return name


# ---- the database --------------------------------------------------------------------------


def _read(query: str, args: tuple = ()) -> list[tuple]:
    """Rows of a read-only query; [] when the database or the table does not exist yet."""
    return sqlite_db.read(db_path(), "models", query, args, _db_error)


def _transaction():
    """One write transaction; creates LLMOS_HOME and the database on first use. Raises `RegistryError`."""
    return sqlite_db.transaction(db_path(), (SCHEMA,), _db_error)


def _db_error(db: Path, e: Exception) -> RegistryError:
    return RegistryError(f"cannot use the llmos database {db} ({e}); if it is corrupt, move it aside (it is "
                         "recreated empty on the next `llmos models add`), or set LLMOS_HOME to another folder.")
