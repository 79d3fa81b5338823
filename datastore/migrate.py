"""Versioned schema migrations, the same numbering on every backend.

``migrations/<dialect>/NNNN_name.sql`` holds version NNNN for that backend.
Each backend applies the missing versions at startup inside one transaction
that first takes a lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory
transaction lock), so workers that start together apply each version once; a
SQLite database already up to date is only read. The table ``schema_version``
records what has been applied.

A version may build an index on the calls table, which takes seconds per
million calls while writes to that table wait. Applying versions, and waiting
for another process that applies them, may take up to ``APPLY_TIMEOUT_S``
rather than a statement's usual timeout (on PostgreSQL, whatever timeouts the
server sets for its sessions), and each version applied is logged.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.domain import utcnow
from config.errors import StoreError
from config.sqlite import is_busy

DIALECTS = ("sqlite", "postgres")
PG_LOCK_KEY = 0x666E71  # "fnq": the advisory lock every fnq migrator takes
# How long applying versions (or waiting for the process applying them) may take: an
# index built on a calls table of tens of millions of rows takes minutes.
APPLY_TIMEOUT_S = 1800.0
# How often a PostgreSQL server applying versions checks that the fnq process that
# asked is still connected (see _pg_applying_settings).
PG_CLIENT_CHECK_MS = 1000
# SQLite: how long one try for the write lock waits while another process applies
# versions (see _begin_applying).
SQLITE_LOCK_TRY_S = 0.1

log = logging.getLogger("fnq.datastore")

_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version integer PRIMARY KEY, name text NOT NULL, applied_at text NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file split at semicolons that end a line; comment lines dropped."""
        text = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in re.split(r";\s*\n", text + "\n") if s.strip()]


def load(dialect: str) -> list[Migration]:
    """The migrations of ``dialect`` in order; their numbers must run 1, 2, 3, ..."""
    folder = Path(__file__).with_name("migrations") / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        numbers = [m.version for m in found]
        raise StoreError(f"{dialect} migrations are not numbered 1..N: {numbers}")
    return found


def _too_new(current: int, known: int) -> StoreError:
    return StoreError(
        f"the database schema is at version {current}, newer than this fnq knows ({known}); "
        "upgrade fnq"
    )


def _stamp() -> str:
    return utcnow().isoformat(timespec="seconds")


def _applying(dialect: str, migration: Migration, upgrade: bool) -> float:
    """Log the start of ``migration`` (quietly when the database is being created)."""
    log.log(logging.INFO if upgrade else logging.DEBUG,
            "applying %s datastore schema version %d (%s); on a large calls table this "
            "takes a while, and writes wait meanwhile", dialect, migration.version,
            migration.name)  # fmt: skip
    return time.monotonic()


def _applied(dialect: str, migration: Migration, began: float, upgrade: bool) -> None:
    log.log(logging.INFO if upgrade else logging.DEBUG,
            "applied %s datastore schema version %d in %.1f s", dialect, migration.version,
            time.monotonic() - began)  # fmt: skip


def _sqlite_version(conn: sqlite3.Connection) -> int:
    """The schema version of a SQLite database (0: none), read without the write lock."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if found is None:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def apply_sqlite(conn: sqlite3.Connection, stop: threading.Event | None = None) -> int:
    """Bring a SQLite database (autocommit connection) up to date; return its version.

    A database already up to date is only read: opening it does not wait for
    another process's write transaction (WAL readers never do). To stop it from
    another thread, set ``stop`` (seen while it waits for the write lock and
    between statements) and call ``conn.interrupt()`` (ends the statement under
    way, an index build say): nothing is applied then."""
    migrations = load("sqlite")
    current = _sqlite_version(conn)
    if current > len(migrations):
        raise _too_new(current, len(migrations))
    if current == len(migrations):
        return current
    _begin_applying(conn, stop)
    return _apply_sqlite_locked(conn, migrations, stop)


def _stop_if(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StoreError("stopped before the datastore schema was brought up to date")


def _begin_applying(conn: sqlite3.Connection, stop: threading.Event | None) -> None:
    """``BEGIN IMMEDIATE``, waiting for the write lock as long as another process may
    take to apply versions (``APPLY_TIMEOUT_S``), ``SQLITE_LOCK_TRY_S`` a try, so that
    ``stop`` is seen between tries (SQLite's interrupt does not end a wait for a lock)."""
    busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_LOCK_TRY_S * 1000)}")
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    try:
        while True:
            _stop_if(stop)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() >= deadline:
                    raise
            else:
                return
    finally:
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")


def _apply_sqlite_locked(
    conn: sqlite3.Connection, migrations: list[Migration], stop: threading.Event | None
) -> int:
    """Apply the missing versions inside the transaction ``_begin_applying`` began; on
    any error (an interrupt included) it is rolled back."""
    try:
        conn.execute(_VERSION_TABLE)
        current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                      .fetchone()[0])  # fmt: skip
        if current > len(migrations):
            raise _too_new(current, len(migrations))  # noqa: TRY301 - rolled back below
        for migration in migrations[current:]:
            began = _applying("sqlite", migration, current > 0)
            for statement in migration.statements():
                _stop_if(stop)
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, _stamp()),
            )
            _applied("sqlite", migration, began, current > 0)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # (an interrupted statement may have rolled it back)
            conn.execute("ROLLBACK")
        raise
    return max(current, len(migrations))


async def _pg_version(conn: Any, timeout_s: float) -> int:
    """The schema version of the database ``conn`` is on (0: none), read without a lock."""
    if await conn.fetchval("SELECT to_regclass('schema_version')", timeout=timeout_s) is None:
        return 0
    found = await conn.fetchval(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version", timeout=timeout_s
    )
    return int(found)


def _pg_applying_settings(conn: Any, timeout_s: float) -> str:
    """The settings of the transaction that applies versions (``SET LOCAL``: they end
    with it). The server's own limits on a statement and on a wait for a lock (set
    for the role, the database or in FN_DB_URL) give way to ``timeout_s``: a worker
    would otherwise stop at the same point of the same index build on every start.
    On PostgreSQL 14 and later the server also checks every
    ``PG_CLIENT_CHECK_MS`` that the client is still there: a process stopped while
    it applies a version (SIGTERM, SIGKILL) has its build stopped and its locks let
    go within that time, rather than when the build ends, writes waiting all along."""
    ms = max(1, int(timeout_s * 1000))
    statements = [f"SET LOCAL statement_timeout = {ms}", f"SET LOCAL lock_timeout = {ms}"]
    if conn.get_server_version().major >= 14:
        statements.append(f"SET LOCAL client_connection_check_interval = {PG_CLIENT_CHECK_MS}")
    return "; ".join(statements)


async def apply_postgres(
    conn: Any, timeout_s: float, apply_timeout_s: float = APPLY_TIMEOUT_S
) -> int:
    """Bring a PostgreSQL database up to date through an asyncpg connection.

    A database already up to date is only read (no lock, no DDL): a read-only
    server (a standby) and a role that may not create tables open it as well.
    Reading the version takes at most ``timeout_s`` a statement; taking the lock
    and applying each version, ``apply_timeout_s``."""
    migrations = load("postgres")
    current = await _pg_version(conn, timeout_s)
    if current > len(migrations):
        raise _too_new(current, len(migrations))
    if current == len(migrations):
        return current
    timeout_s = apply_timeout_s
    async with conn.transaction():
        await conn.execute(_pg_applying_settings(conn, timeout_s), timeout=timeout_s)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_LOCK_KEY, timeout=timeout_s)
        await conn.execute(_VERSION_TABLE, timeout=timeout_s)
        current = int(
            await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version", timeout=timeout_s
            )
        )
        if current > len(migrations):
            raise _too_new(current, len(migrations))
        for migration in migrations[current:]:
            began = _applying("postgres", migration, current > 0)
            await conn.execute(migration.sql, timeout=timeout_s)
            await conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                _stamp(),
                timeout=timeout_s,
            )
            _applied("postgres", migration, began, current > 0)
    return max(current, len(migrations))
