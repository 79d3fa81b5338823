"""Opening SQLite files shared by several processes (the embedded backends)."""

from __future__ import annotations

import sqlite3
import time

_RETRY_PAUSE_S = 0.01


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch ``conn``'s database to WAL mode, waiting out other openers.

    Changing the journal mode needs an exclusive lock, and SQLite does not run
    its busy handler for that step when another connection is opening the same
    fresh file at the same moment: the pragma fails at once with "database is
    locked". Retry it until ``timeout_s`` has passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF
            if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE_S)
        else:
            return
