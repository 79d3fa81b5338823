"""Opening SQLite files shared by several processes (the embedded backends)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

_RETRY_PAUSE_S = 0.01
# How often a writer looks again for the write lock: from the first pause, doubling
# up to the longest. A transaction of another process holds it for about one
# commit (a disk flush, a millisecond or two).
LOCK_POLL_FIRST_S = 0.0001
LOCK_POLL_MAX_S = 0.001
# The size a writer cuts the -wal file back to when it starts it over. The file grows
# while a reader holds a transaction open (SQLite cannot start it over until that
# reader is done) and, without a limit, keeps that size as long as a connection is open.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


def create_private(path: Path) -> None:
    """Make the database file ``path`` and its directory if they are missing, readable
    by their owner only (0600 and 0700): they hold calls' bodies and functions'
    config. SQLite gives the -wal and -shm files the database file's mode. A file or
    directory that is there keeps its mode. OSError when they cannot be made."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def full_disk_note(path: Path, error: BaseException) -> str:
    """``" (its file system is full)"`` when the file system holding the database file
    ``path`` has no block left and SQLite's ``error`` does not say so (a -shm or -wal
    file it cannot make is a "disk I/O error"), else ``""``."""
    if "full" in str(error):
        return ""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    return " (its file system is full)" if st.f_bavail == 0 else ""


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """The database is locked by another connection (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_BUSY) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def begin_immediate(conn: sqlite3.Connection, patience_s: float) -> None:
    """``BEGIN IMMEDIATE`` on a connection whose busy timeout is 0, waiting up to
    ``patience_s`` for the write lock; then the "database is locked" error.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15 ... 100 ms between tries.
    When other processes commit every few milliseconds, its tries keep landing
    while one of them holds the lock, and a write waits tens or hundreds of
    milliseconds for a lock that was free most of that time. Here the lock is
    tried again every 0.1 to 1 ms.
    """
    deadline: float | None = None
    pause_s = LOCK_POLL_FIRST_S
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + patience_s
            elif now >= deadline:
                raise
        else:
            return
        time.sleep(pause_s)
        pause_s = min(pause_s * 2, LOCK_POLL_MAX_S)


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch ``conn``'s database to WAL mode, waiting out other openers, and make
    ``conn`` cut the -wal file back to ``WAL_SIZE_LIMIT_BYTES`` when it starts it over.

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
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_PAUSE_S)
        else:
            break
    conn.execute(f"PRAGMA journal_size_limit = {int(WAL_SIZE_LIMIT_BYTES)}")
