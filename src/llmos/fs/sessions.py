"""Chat sessions and their messages, in LLMOS_HOME/llmos.db (SQLite) beside the registry and the users, and where
each session's saved K/V file lives (LLMOS_HOME/sessions/<owner digest>/<id>.safetensors).

Owns the `sessions` and `session_messages` tables. The messages are the truth of a conversation; the K/V file is
only a cache of it (the daemon writes and reads it, see llmos.server.sessions). Never loads a model or a tensor.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from llmos.errors import LlmosError
from llmos.fs import db as sqlite_db
from llmos.fs import registry

ROLES = ("system", "user", "assistant")
ID_PATTERN = re.compile(r"s[0-9a-f]{16}")  # "s" + 16 hex digits (64 random bits)
KV_SUFFIX = ".safetensors"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, "
    "title TEXT, created REAL NOT NULL, updated REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, updated)",
    "CREATE TABLE IF NOT EXISTS session_messages (session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, "
    "seq INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')), "
    "content TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (session, seq))",
)
SESSION_COLUMNS = ("s.id, s.owner, s.model, s.title, s.created, s.updated, "
                   "(SELECT COUNT(*) FROM session_messages m WHERE m.session = s.id)")


class SessionsError(LlmosError):
    """A session request is invalid (unknown session, bad role), or llmos.db is unusable."""


@dataclass(frozen=True)
class Session:
    """One chat: `id` ("s" + 16 hex), `owner`, `model` (the name it was created with), `title` (or None),
    `created` and `updated` (Unix seconds) and how many `messages` it holds (a system prompt counts)."""

    id: str
    owner: str
    model: str
    title: str | None
    created: float
    updated: float
    messages: int = 0


@dataclass(frozen=True)
class Message:
    """One message of a session: `role` (system, user or assistant), `content`, `created` (Unix seconds)."""

    role: str
    content: str
    created: float

    def as_chat(self) -> dict:
        """{"role", "content"}: what a chat template takes."""
        return {"role": self.role, "content": self.content}


class SessionStore:
    """Sessions and messages in one SQLite file (default: llmos.db in LLMOS_HOME, fixed at construction).

    Same conventions as `UserStore`: a connection per call (any thread, any process), writes in single
    `BEGIN IMMEDIATE` transactions with WAL and foreign keys, reads never create the file. Raises `SessionsError`
    for bad input and for a database that cannot be opened.
    """

    def __init__(self, db_path: str | Path | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else registry.db_path()

    def create(self, owner: str, model: str, title: str | None = None, system: str | None = None) -> Session:
        """A new session of `owner` on `model`; `system`, when given, is its first message (role system)."""
        now = time.time()
        with self._transaction() as conn:
            sid = new_id()
            while conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone():
                sid = new_id()
            conn.execute("INSERT INTO sessions (id, owner, model, title, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                         (sid, owner, model, title, now, now))
            if system:
                conn.execute("INSERT INTO session_messages (session, seq, role, content, created) "
                             "VALUES (?, 0, 'system', ?, ?)", (sid, system, now))
        return Session(sid, owner, model, title, now, now, 1 if system else 0)

    def get(self, sid: str) -> Session | None:
        """Session `sid`, or None (also for a malformed id)."""
        if not is_id(sid):
            return None
        rows = self._read(f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.id = ?", (sid,))
        return Session(*rows[0]) if rows else None

    def list(self, owner: str | None = None) -> list[Session]:
        """`owner`'s sessions (None: everyone's), most recently updated first."""
        where, args = (" WHERE s.owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self._read(f"SELECT {SESSION_COLUMNS} FROM sessions s{where} ORDER BY s.updated DESC, s.id", args)
        return [Session(*row) for row in rows]

    def messages(self, sid: str) -> list[Message]:
        """The messages of session `sid` in order ([] for an unknown session)."""
        rows = self._read("SELECT role, content, created FROM session_messages WHERE session = ? ORDER BY seq", (sid,))
        return [Message(*row) for row in rows]

    def append(self, sid: str, messages: list[tuple[str, str]]) -> Session:
        """Add `messages` ((role, content) pairs) at the end of session `sid`, in one transaction, and mark it
        updated. Raises `SessionsError` for an unknown session or role."""
        for role, content in messages:
            if role not in ROLES or not isinstance(content, str):
                raise SessionsError(f"invalid message ({role!r}, {type(content).__name__}): the role must be one of "
                                    f"{', '.join(ROLES)} and the content text.")
        now = time.time()
        with self._transaction() as conn:
            if not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone():
                raise _unknown(sid)
            seq, = conn.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM session_messages WHERE session = ?",
                                (sid,)).fetchone()
            conn.executemany("INSERT INTO session_messages (session, seq, role, content, created) "
                             "VALUES (?, ?, ?, ?, ?)",
                             [(sid, seq + i, role, content, now) for i, (role, content) in enumerate(messages)])
            conn.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, sid))
            row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions s WHERE s.id = ?", (sid,)).fetchone()
        return Session(*row)

    def delete(self, sid: str) -> Session:
        """Remove session `sid`, its messages and its K/V file; returns it as it was. Raises `SessionsError` for
        an unknown session."""
        session = self.get(sid)
        if session is None:
            raise _unknown(sid)
        with self._transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))  # messages go with it (ON DELETE CASCADE)
        self.kv_path(session.owner, sid).unlink(missing_ok=True)
        return session

    def kv_path(self, owner: str, sid: str) -> Path:
        """Where session `sid`'s saved K/V live: <LLMOS_HOME>/sessions/<sha256(owner)[:32]>/<sid>.safetensors
        (a digest, so any owner name is a safe path). Raises `SessionsError` for a malformed id."""
        if not is_id(sid):
            raise _unknown(sid)
        digest = hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]
        return self.db_path.parent / "sessions" / digest / f"{sid}{KV_SUFFIX}"

    # ---- the database ------------------------------------------------------------------------------

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read-only query; [] when the database or its tables do not exist yet."""
        return sqlite_db.read(self.db_path, "sessions", query, args, _db_error)

    def _transaction(self):
        """One write transaction; creates the database and the tables on first use (see llmos.fs.db)."""
        return sqlite_db.transaction(self.db_path, SCHEMA, _db_error)


def new_id() -> str:
    """A fresh session id: "s" + 16 hex digits."""
    return "s" + secrets.token_hex(8)


def is_id(sid: object) -> bool:
    return isinstance(sid, str) and ID_PATTERN.fullmatch(sid) is not None


def _unknown(sid: str) -> SessionsError:
    return SessionsError(f"no session {sid!r}; GET /v1/sessions lists yours.")


def _db_error(db: Path, e: Exception) -> SessionsError:
    return SessionsError(f"cannot use the llmos database {db} ({e}); if it is corrupt, move it aside (users, keys, "
                         "registered models and sessions are then gone), or set LLMOS_HOME to another folder.")
