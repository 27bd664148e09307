"""The one SQLite database in LLMOS_HOME (llmos.db): read and write helpers every store shares.

Owns connection handling: read-only queries that create nothing, and write transactions (BEGIN IMMEDIATE ...
COMMIT, rolled back on any error) that create the folder, the database and the caller's tables on first use,
with WAL (readers never wait for a writer), foreign keys and a 10 s busy timeout. Each store (registry, users,
sessions) brings its schema and its error type.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

ErrorFactory = Callable[[Path, Exception], Exception]


def read(db: Path, table: str, query: str, args: tuple, error: ErrorFactory) -> list[tuple]:
    """Rows of a read-only `query`; [] when the database or `table` does not exist yet (nothing is created).
    Raises `error(db, e)` when the file cannot be read as an SQLite database."""
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=10.0)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                return []
            return conn.execute(query, args).fetchall()
    except sqlite3.Error as e:
        raise error(db, e) from None


@contextmanager
def transaction(db: Path, schema: Sequence[str], error: ErrorFactory) -> Iterator[sqlite3.Connection]:
    """One write transaction on `db`, after running the `schema` statements (CREATE ... IF NOT EXISTS).
    Raises `error(db, e)` naming the file when it cannot be opened or is not an SQLite database."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db, timeout=10.0, isolation_level=None)
    except (OSError, sqlite3.Error) as e:
        raise error(db, e) from None
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in schema:
                conn.execute(statement)
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise error(db, e) from None
    finally:
        conn.close()
