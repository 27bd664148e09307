"""Users, API keys and quotas for the daemon, in LLMOS_HOME/llmos.db (SQLite) beside the model registry.

Owns the `users`, `api_keys` and `quotas` tables and the check of an API key. Never stores a key's secret: only a
random salt and its scrypt hash; the full key exists once, in what `create_key` returns.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from llmos.errors import LlmosError
from llmos.fs import db as sqlite_db
from llmos.fs import registry

ROLES = ("admin", "user")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_PATTERN = re.compile(r"sk-llmos-([0-9a-f]{8})-([A-Za-z0-9_-]{32})")  # sk-llmos-<key_id>-<secret>
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}  # RFC 7914; ~16 MiB and tens of ms per key check
SALT_BYTES = 16
CACHE_SIZE = 1024  # verified keys remembered per UserStore
LAST_USED_EVERY_S = 60.0  # a key's last_used is written at most this often (seconds) by one UserStore
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, "
    "role TEXT NOT NULL CHECK (role IN ('admin', 'user')), created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS api_keys (key_id TEXT PRIMARY KEY, "
    "user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE, salt BLOB NOT NULL, hash BLOB NOT NULL, "
    "created REAL NOT NULL, last_used REAL, label TEXT)",
    "CREATE INDEX IF NOT EXISTS api_keys_by_user ON api_keys (user)",
    "CREATE TABLE IF NOT EXISTS quotas (user TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE, "
    "max_processes INTEGER, tokens_per_minute INTEGER, max_kv_blocks INTEGER)",
)
USER_COLUMNS = ("u.name, u.role, u.created, q.max_processes, q.tokens_per_minute, q.max_kv_blocks, "
                "(SELECT COUNT(*) FROM api_keys c WHERE c.user = u.name)")
USER_FROM = "users u LEFT JOIN quotas q ON q.user = u.name"


class UsersError(LlmosError):
    """A user or key request is invalid (bad name, unknown user or key, the last admin), or llmos.db is unusable."""


@dataclass(frozen=True)
class Quota:
    """A user's limits; None is unlimited. Processes alive at once, tokens per minute, KV cache blocks held."""

    max_processes: int | None = None
    tokens_per_minute: int | None = None
    max_kv_blocks: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_processes is None and self.tokens_per_minute is None and self.max_kv_blocks is None


@dataclass(frozen=True)
class User:
    """One user: `name`, `role` ('admin' or 'user'), `created` (Unix seconds), `quota`, and how many API `keys`."""

    name: str
    role: str
    created: float
    quota: Quota = field(default_factory=Quota)
    keys: int = 0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key besides its secret: id, owner, label, created and last used (Unix seconds)."""

    key_id: str
    user: str
    label: str | None
    created: float
    last_used: float | None


@dataclass
class _Verified:
    """A key scrypt has accepted: sha256 of the full key, the stored hash it matched, when last_used was written."""

    user: str
    digest: bytes
    stored_hash: bytes
    touched: float


class UserStore:
    """Users, API keys and quotas in one SQLite file (default: llmos.db in LLMOS_HOME, fixed at construction).

    Every method opens its own connection, so one store may serve many threads and many stores (or processes)
    may share the file; writes are single `BEGIN IMMEDIATE` transactions. Reads never create the file.
    Raises `UsersError` for bad input and for a database that cannot be opened.

    `authenticate` costs one scrypt (tens of ms) the first time a key is seen and a sha256 plus one primary-key
    read after that: the store remembers verified keys (an LRU of key_id -> sha256(key) and the stored hash), but
    every call still reads the key's row, so a key revoked or a user removed by any process fails at once.
    """

    def __init__(self, db_path: str | Path | None = None) -> None:
        self.db_path = Path(db_path) if db_path is not None else registry.db_path()
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    # ---- users -----------------------------------------------------------------------------------

    def add_user(self, name: str, role: str | None = None) -> User:
        """Add user `name` with `role`; None means admin for the first user and user after that.

        Raises `UsersError` for an invalid name or role, a taken name, or role 'user' while no admin exists
        (the first user must be an admin, so that someone can manage the others).
        """
        name = check_name(name)
        if role is not None and role not in ROLES:
            raise UsersError(f"invalid role {role!r}: use admin or user.")
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UsersError(f"a user named {name!r} already exists; pick another name, or remove it first "
                                 f"with `llmos user rm {name}`.")
            has_admin = conn.execute("SELECT 1 FROM users WHERE role = 'admin'").fetchone() is not None
            if role is None:
                role = "user" if has_admin else "admin"
            elif role == "user" and not has_admin:
                raise UsersError(f"there is no admin yet, so the first user must be one: "
                                 f"`llmos user add {name} --role admin`.")
            created = time.time()
            conn.execute("INSERT INTO users (name, role, created) VALUES (?, ?, ?)", (name, role, created))
        return User(name, role, created)

    def remove_user(self, name: str) -> User:
        """Remove user `name` with its keys and quota; returns it as it was.

        Their sessions, session K/V files and hibernated processes on disk are deleted with them, so a later
        user of the same name inherits nothing (processes still live in a running daemon end with it or are
        killed by an admin). Raises `UsersError` for an unknown user, or for the last admin while other users
        exist.
        """
        with self._transaction() as conn:
            user = self._get_user(conn, name)
            if user.is_admin:
                admins, = conn.execute("SELECT COUNT(*) FROM users WHERE role = 'admin'").fetchone()
                others, = conn.execute("SELECT COUNT(*) FROM users WHERE name != ?", (name,)).fetchone()
                if admins == 1 and others:
                    raise UsersError(f"{name!r} is the last admin and {others} other user(s) exist; add another "
                                     "admin first (`llmos user add NAME --role admin`), or remove the others.")
            conn.execute("DELETE FROM users WHERE name = ?", (name,))  # keys and quota go with it (ON DELETE CASCADE)
            # Their sessions too, so that a later user of the same name inherits nothing.
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'").fetchone():
                conn.execute("DELETE FROM session_messages WHERE session IN (SELECT id FROM sessions WHERE owner = ?)",
                             (name,))
                conn.execute("DELETE FROM sessions WHERE owner = ?", (name,))
        self._forget(user=name)
        home = self.db_path.parent
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        for d in (home / "hibernate" / digest, home / "sessions" / digest):  # hibernated processes, session K/V
            shutil.rmtree(d, ignore_errors=True)
        return user

    def get_user(self, name: str) -> User | None:
        """User `name` with its quota and key count, or None."""
        rows = self._read(f"SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.name = ?", (name,))
        return _user(rows[0]) if rows else None

    def list_users(self) -> list[User]:
        """Every user by name, with quotas and key counts. Empty when the database does not exist yet."""
        return [_user(row) for row in self._read(f"SELECT {USER_COLUMNS} FROM {USER_FROM} ORDER BY u.name")]

    def has_users(self) -> bool:
        """Whether any user exists. With none the daemon runs in single-user mode, on loopback only."""
        return bool(self._read("SELECT 1 FROM users LIMIT 1"))

    def auth_required(self, host: str) -> bool:
        """Whether a daemon listening on `host` must ask every request for an API key (True when users exist).

        With no users it serves one implicit user, which is safe on a loopback address only. Raises `UsersError`
        when `host` is not loopback (e.g. 0.0.0.0, a LAN address or a host name other than localhost) and no user
        exists yet.
        """
        if self.has_users():
            return True
        if not is_loopback(host):
            raise UsersError(f"refusing to listen on {host}: with no users llmos runs in single-user mode, which "
                             "is safe on loopback only; add an admin first (`llmos user add NAME --role admin`) "
                             "so that requests need API keys, or listen on 127.0.0.1.")
        return False

    # ---- quotas ------------------------------------------------------------------------------------

    def set_quota(self, name: str, max_processes: int | None = None, tokens_per_minute: int | None = None,
                  max_kv_blocks: int | None = None) -> Quota:
        """Set all three of `name`'s limits (None: unlimited; all None removes the quota). Returns the new quota.

        Raises `UsersError` for an unknown user or a limit that is not a whole number >= 0.
        """
        quota = Quota(max_processes, tokens_per_minute, max_kv_blocks)
        for what, value in vars(quota).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63):
                raise UsersError(f"invalid {what.replace('_', ' ')} {value!r}: give a whole number from 0 to 2**63 - 1, "
                                 "or nothing for unlimited.")
        with self._transaction() as conn:
            self._get_user(conn, name)
            if quota.unlimited:
                conn.execute("DELETE FROM quotas WHERE user = ?", (name,))
            else:
                conn.execute("INSERT OR REPLACE INTO quotas (user, max_processes, tokens_per_minute, max_kv_blocks) "
                             "VALUES (?, ?, ?, ?)", (name, max_processes, tokens_per_minute, max_kv_blocks))
        return quota

    def get_quota(self, name: str) -> Quota:
        """`name`'s limits. Raises `UsersError` for an unknown user."""
        user = self.get_user(name)
        if user is None:
            raise _unknown_user(name)
        return user.quota

    # ---- API keys ----------------------------------------------------------------------------------

    def create_key(self, name: str, label: str | None = None) -> str:
        """A new API key for user `name`: `sk-llmos-<key_id>-<secret>`, returned this once and never stored.

        key_id is 8 hex digits (shown by `list_keys`); secret is 32 URL-safe characters (192 bits) from `secrets`.
        Only a 16-byte random salt and scrypt(secret, salt) are kept (Percival 2009, RFC 7914).
        Raises `UsersError` for an unknown user or a label longer than 100 characters or holding control
        characters.
        """
        label = check_label(label)
        secret = secrets.token_urlsafe(24)
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _scrypt(secret, salt)  # before the transaction: it takes tens of ms
        with self._transaction() as conn:
            self._get_user(conn, name)
            key_id = secrets.token_hex(4)
            while conn.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone():
                key_id = secrets.token_hex(4)
            conn.execute("INSERT INTO api_keys (key_id, user, salt, hash, created, last_used, label) "
                         "VALUES (?, ?, ?, ?, ?, NULL, ?)", (key_id, name, salt, digest, time.time(), label))
        return f"sk-llmos-{key_id}-{secret}"

    def revoke_key(self, key_id: str) -> ApiKey:
        """Delete the key `key_id` (a full key is accepted too); returns it as it was. It stops working at once,
        in every process. Raises `UsersError` when no such key exists.
        """
        full = KEY_PATTERN.fullmatch(key_id)
        key_id = full.group(1) if full else key_id
        with self._transaction() as conn:
            row = conn.execute("SELECT key_id, user, label, created, last_used FROM api_keys WHERE key_id = ?",
                               (key_id,)).fetchone()
            if row is None:
                raise UsersError(f"no API key with id {key_id!r}; `llmos user keys` lists them.")
            conn.execute("DELETE FROM api_keys WHERE key_id = ?", (key_id,))
        self._forget(key_id=key_id)
        return ApiKey(*row)

    def list_keys(self, name: str | None = None) -> list[ApiKey]:
        """The keys of user `name` (None: everyone's), by user then creation; never secrets or hashes.

        Raises `UsersError` when `name` is given and no such user exists.
        """
        if name is not None and self.get_user(name) is None:
            raise _unknown_user(name)
        query = "SELECT key_id, user, label, created, last_used FROM api_keys"
        rows = self._read(query + (" WHERE user = ?" if name is not None else "") + " ORDER BY user, created",
                          (name,) if name is not None else ())
        return [ApiKey(*row) for row in rows]

    def authenticate(self, key: str) -> User | None:
        """The user a presented API key belongs to, or None for a malformed, unknown, revoked or wrong key.

        Always reads the key's row (key_id is its primary key) joined with its user and quota, so the answer,
        role and quota included, is as fresh as the database. The costly check is skipped when this store has
        already verified this exact key against this exact stored hash: the cache keeps sha256(full key), never
        the key, and compares both digests with `hmac.compare_digest`. Raises `UsersError` only when the
        database cannot be read.
        """
        match = KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            return None
        key_id, secret = match.groups()
        rows = self._read(f"SELECT k.salt, k.hash, {USER_COLUMNS} FROM api_keys k JOIN users u ON u.name = k.user "
                          "LEFT JOIN quotas q ON q.user = u.name WHERE k.key_id = ?", (key_id,))
        if not rows:
            self._forget(key_id=key_id)
            return None
        salt, stored_hash, *user_row = rows[0]
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            seen = self._verified.get(key_id)
            if seen is not None:
                self._verified.move_to_end(key_id)
        fresh = not (seen is not None and hmac.compare_digest(seen.digest, digest)
                     and hmac.compare_digest(seen.stored_hash, stored_hash))
        if fresh:
            if not hmac.compare_digest(_scrypt(secret, salt), stored_hash):
                return None
            seen = _Verified(user_row[0], digest, stored_hash, touched=0.0)
            with self._lock:
                self._verified[key_id] = seen
                while len(self._verified) > CACHE_SIZE:
                    self._verified.popitem(last=False)
        now = time.time()
        if now - seen.touched >= LAST_USED_EVERY_S:
            seen.touched = now
            self._touch(key_id, now)
        return _user(user_row)

    # ---- the database ------------------------------------------------------------------------------

    def _get_user(self, conn: sqlite3.Connection, name: str) -> User:
        row = conn.execute(f"SELECT {USER_COLUMNS} FROM {USER_FROM} WHERE u.name = ?", (name,)).fetchone()
        if row is None:
            raise _unknown_user(name)
        return _user(row)

    def _forget(self, key_id: str | None = None, user: str | None = None) -> None:
        """Drop cached verifications: the one of key `key_id`, or all of `user`'s."""
        with self._lock:
            for k in [k for k, v in self._verified.items() if k == key_id or v.user == user]:
                del self._verified[k]

    def _touch(self, key_id: str, now: float) -> None:
        """Record a key's use. Best effort: last_used is informational, so a busy database does not fail a request."""
        try:
            with closing(sqlite3.connect(self.db_path, timeout=1.0, isolation_level=None)) as conn:
                conn.execute("UPDATE api_keys SET last_used = ? WHERE key_id = ?", (now, key_id))
        except sqlite3.OperationalError:
            pass

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read-only query; [] when the database or its tables do not exist yet."""
        return sqlite_db.read(self.db_path, "users", query, args, _db_error)

    def _transaction(self):
        """One write transaction; creates the folder, the database and the tables on first use (WAL, foreign
        keys for the cascades, 10 s busy timeout; see llmos.fs.db). Raises `UsersError` naming the file."""
        return sqlite_db.transaction(self.db_path, SCHEMA, _db_error)


def check_name(name: str) -> str:
    """`name` if it is a valid user name (1-64 of A-Z a-z 0-9 _ . -); raises `UsersError` otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsersError(f"invalid user name {name!r}: use 1 to 64 letters, digits and _ . - (e.g. alice or "
                         "ci-bot.01).")
    return name


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP address or a host name) is this machine only: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def check_label(label: str | None) -> str | None:
    """A key label, stripped (None when empty); raises `UsersError` past 100 characters or for control characters."""
    if label is None or not label.strip():
        return None
    if len(label) > 100 or any(not c.isprintable() for c in label):
        raise UsersError(f"invalid key label {label!r}: use at most 100 printable characters.")
    return label.strip()


def _user(row: tuple) -> User:
    name, role, created, max_processes, tokens_per_minute, max_kv_blocks, keys = row
    return User(name, role, created, Quota(max_processes, tokens_per_minute, max_kv_blocks), keys)


def _unknown_user(name: str) -> UsersError:
    return UsersError(f"no user named {name!r}; `llmos user list` lists them.")


def _db_error(db: Path, e: Exception) -> UsersError:
    return UsersError(f"cannot use the llmos database {db} ({e}); if it is corrupt, move it aside (users, keys "
                      "and registered models are then gone), or set LLMOS_HOME to another folder.")
