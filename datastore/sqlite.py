"""The embedded datastore: one SQLite file in WAL mode, safe across processes.

sqlite3 blocks, so it never runs on the event loop. Writes go to one writer
thread with its own connection: the group-commit task hands it a batch, the
thread runs the whole batch in one ``BEGIN IMMEDIATE`` transaction and commits
once (one bad write fails alone: see ``run_batch``). Reads go to a second
thread with a read-only connection; WAL lets it read while the writer writes.
Other processes (the CLI, more workers) write to the same file: the writer
waits for the file's write lock up to ``BUSY_TIMEOUT_S``, trying again every
0.1 to 1 ms (config.sqlite.begin_immediate); past that the batch counts as an
outage and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from config.settings import Settings, sqlite_path
from config.sqlite import begin_immediate, create_private, enable_wal, full_disk_note
from datastore import migrate, sql
from datastore.backend import Write
from datastore.base import LogStore
from datastore.batch import Failed, GroupCommit
from datastore.common import SqlDatastore
from datastore.errors import StoreError, StoreUnavailable

BUSY_TIMEOUT_S = 5.0
STOP_OPEN_POLL_S = 0.2  # a cancelled open: how often its migration is interrupted again
# Primary result codes that mean "try again later" rather than "this write is wrong".
# BUSY, LOCKED, NOMEM, IOERR, FULL, CANTOPEN, PROTOCOL
_TRANSIENT_CODES = frozenset({5, 6, 7, 10, 13, 14, 15})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# What a write may fail with for good: SQLite's errors, and the driver's own for a value
# it cannot send (a lone surrogate in text: UnicodeEncodeError; an int over 64 bits).
_REFUSED = (sqlite3.Error, ValueError, OverflowError)

_Op = tuple[Write, dict[str, Any], bytes | None]


def path_from_url(url: str) -> Path:
    try:
        return sqlite_path(url, "FN_DB_URL")
    except ValueError as exc:
        raise StoreError(str(exc)) from None


def to_us(value: datetime) -> int:
    # In integers: a float of the seconds is off by microseconds before 1685 or after 2255.
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_us(value: int | None) -> datetime | None:
    if value is None:
        return None
    seconds, micros = divmod(int(value), 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)


def encode(params: dict[str, Any]) -> dict[str, Any]:
    return {k: to_us(v) if isinstance(v, datetime) else v for k, v in params.items()}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in _TRANSIENT_CODES
    return False


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the disk has no room for the transaction (a smaller one may fit)."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF) == sqlite3.SQLITE_FULL
    return False


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        enable_wal(conn, BUSY_TIMEOUT_S)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def batch_scheduling() -> None:
    """Put the calling thread under Linux's SCHED_BATCH policy (elsewhere: nothing).

    The writer thread keeps its full share of the CPU, but its wakeups no longer
    preempt the thread that woke it. Handing it a batch woke it on the event
    loop's own CPU, where it ran at once while the loop waited; under a burst
    that was a quarter of the time the loop spent waiting for a CPU.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None:
        with contextlib.suppress(OSError):  # not allowed here: run as we are
            os.sched_setscheduler(0, policy, os.sched_param(0))


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(zip(row.keys(), tuple(row), strict=True))
    for key in sql.TIME_COLUMNS.intersection(out):
        out[key] = from_us(out[key])
    return out


# Writes that are one plain statement: those reporting whether they changed a row,
# and those reporting nothing.
_CHANGED_ONE = {Write.FN_INSERT: sql.FN_INSERT, Write.FN_UPDATE: sql.FN_UPDATE,
                Write.FN_DELETE: sql.FN_DELETE, Write.WORKER_GONE: sql.WORKER_GONE,
                Write.END_BURIED: sql.CALL_END_BURIED}  # fmt: skip
_PLAIN = {Write.QUEUED: sql.CALL_QUEUED, Write.LOG_PUT: sql.LOG_PUT,
          Write.WORKER_BEAT: sql.WORKER_BEAT}  # fmt: skip
# A call's outcome: whether it was written is the count of changed rows. Without
# RETURNING the statement is one step, not two (each step lets go of the GIL and
# takes it back, a hand-off with the event loop's thread when it waits for it).
_OUTCOME = {
    (kind, keep_log): stmt.removesuffix(" RETURNING id")
    for kind, keep_log, stmt in (
        (Write.FINISH, False, sql.CALL_FINISH),
        (Write.RETRY, False, sql.CALL_RETRY[False]),
        (Write.RETRY, True, sql.CALL_RETRY[True]),
    )
}


# Ended calls older than the cutoff, oldest first, a chunk at a time, found through the
# completion index: ``+status`` keeps SQLite (which has no statistics to go by) from
# walking the status index instead, which would read every ended call of the table for
# each chunk: a purge quadratic in the table's size.
PURGE = (
    "DELETE FROM calls WHERE id IN (SELECT id FROM calls"
    f" WHERE +status IN {sql.FINAL} AND completed_at < :cutoff ORDER BY completed_at"
    " LIMIT :limit) RETURNING id"
)

IDS_IN = "IN (SELECT value FROM json_each(:ids))"
PURGE_IDS = sql.PURGE_IDS.format(ids_in=IDS_IN)
# The purges: each returns the ids it deleted.
_DELETED_IDS = {Write.PURGE: PURGE, Write.PURGE_IDS: PURGE_IDS}


def apply(conn: sqlite3.Connection, kind: Write, params: dict[str, Any], log: bytes | None) -> Any:
    """One write against the open transaction; the result ``Write`` documents."""
    p = encode(params)
    if kind in _CHANGED_ONE:
        return conn.execute(_CHANGED_ONE[kind], p).rowcount == 1
    if kind in _PLAIN:
        conn.execute(_PLAIN[kind], p)
        return None
    if kind is Write.RUNNING:
        conn.execute(sql.CALL_RUNNING, p)
        return _row(conn.execute(sql.CALL_GET_RECORD, {"id": p["id"]}).fetchone())
    if kind in (Write.FINISH, Write.RETRY):
        stmt = _OUTCOME[kind, bool(p.get("keep_log"))]
        written = conn.execute(stmt, p).rowcount == 1
        if written and log is not None:
            conn.execute(sql.LOG_PUT, {"call_id": p["id"], "data": log})
        return written
    if kind is Write.CANCEL:
        conn.execute(sql.CALL_CANCEL_QUEUED, p)
        conn.execute(sql.CALL_CANCEL_RUNNING, p)
        found = conn.execute(sql.CALL_GET_RECORD, {"id": p["id"]}).fetchone()
        return None if found is None else _row(found)
    if kind is Write.REQUEUE:
        requeued = conn.execute(sql.CALL_REQUEUE, p).fetchone() is not None
        if requeued:
            conn.execute(sql.LOG_DELETE, {"call_id": p["id"]})
        return requeued
    if kind in _DELETED_IDS:
        return [r[0] for r in conn.execute(_DELETED_IDS[kind], p).fetchall()]
    if kind is Write.LOG_DELETE:
        conn.executemany(sql.LOG_DELETE, [{"call_id": i} for i in p["call_ids"]])
        return None
    if kind is Write.WORKER_PRUNE:
        return conn.execute(sql.WORKER_PRUNE, p).rowcount
    raise AssertionError(f"unknown write {kind}")


# Writes that a crash may lose: a `running` mark is written again when the call's
# message is delivered again, and a worker's heartbeat comes again. A batch of
# only these commits without waiting for the disk (WAL with synchronous=NORMAL
# still survives a crash of the process; a power cut may lose its last commits).
# Any other write makes its batch, and everything committed before it, durable.
_LOSABLE = frozenset({Write.RUNNING, Write.WORKER_BEAT})


def _set_sync(conn: sqlite3.Connection, ops: list[_Op], state: dict[str, str]) -> None:
    """Per batch, when it changes (the pragma applies to the next commit). ``state``
    remembers the last value set on ``conn``."""
    wanted = "NORMAL" if all(kind in _LOSABLE for kind, _, _ in ops) else "FULL"
    if state.get("synchronous") != wanted:
        conn.execute(f"PRAGMA synchronous = {wanted}")
        state["synchronous"] = wanted


def run_batch(conn: sqlite3.Connection, ops: list[_Op], state: dict[str, str]) -> list[Any]:
    """All of ``ops`` in one transaction; raises (after rollback) on a transient error.
    ``state``: the pragmas last set on ``conn``, which every write on it must share
    (a write that relaxed ``synchronous`` unseen would leave the next batches relaxed).

    An operation that fails for good is rolled back alone and reported as
    ``Failed``. The batch first runs as it is: writes seldom fail, and a
    savepoint around each costs two more statements, each a hand-off of the
    GIL. If one fails, everything is rolled back and the batch runs again with
    a savepoint per operation. A batch of one needs none.
    """
    _set_sync(conn, ops, state)
    if len(ops) == 1:
        return _transaction(conn, lambda: [_apply_alone(conn, ops[0])])
    try:
        return _transaction(conn, lambda: _committed(conn, [apply(conn, *op) for op in ops]))
    except _REFUSED as exc:
        if is_transient(exc):
            raise
    return _transaction(conn, lambda: _committed(conn, [_apply_saved(conn, op) for op in ops]))


def _transaction(conn: sqlite3.Connection, work: Callable[[], list[Any]]) -> list[Any]:
    """``work()`` in a new transaction; on any error it is rolled back."""
    begin_immediate(conn, BUSY_TIMEOUT_S)
    try:
        return work()
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _committed(conn: sqlite3.Connection, results: list[Any]) -> list[Any]:
    conn.execute("COMMIT")
    return results


def _apply_saved(conn: sqlite3.Connection, op: _Op) -> Any:
    """One operation inside its own savepoint: if it fails for good, only it is undone."""
    conn.execute("SAVEPOINT op")
    return _settle(conn, op, done="RELEASE op", undo=("ROLLBACK TO op", "RELEASE op"))


def _apply_alone(conn: sqlite3.Connection, op: _Op) -> Any:
    """The only operation of the open transaction: commit it, or roll it all back."""
    return _settle(conn, op, done="COMMIT", undo=("ROLLBACK",))


def _settle(conn: sqlite3.Connection, op: _Op, *, done: str, undo: tuple[str, ...]) -> Any:
    """Apply ``op``, then run ``done``; if it fails for good, run ``undo`` instead and
    return the failure (a transient error is raised)."""
    kind, params, log = op
    try:
        result = apply(conn, kind, params, log)
    except _REFUSED as exc:
        if is_transient(exc):
            raise
        for statement in undo:
            conn.execute(statement)
        return Failed(StoreError(f"{kind.value} failed: {exc}"))
    conn.execute(done)
    return result


class SqliteDatastore(SqlDatastore):
    IDS_IN = IDS_IN
    PURGE_CHUNK_IDS = sql.purge_chunk_ids("+status")  # see PURGE
    FNS_GET = (
        "SELECT fns.* FROM json_each(:keys) AS k JOIN fns"
        " ON fns.app = json_extract(k.value, '$[0]') AND fns.name = json_extract(k.value, '$[1]')"
    )

    def __init__(self, settings: Settings, logs: LogStore | None, path: Path) -> None:
        super().__init__(settings, logs)
        self.path = path
        self._writer_thread = ThreadPoolExecutor(
            1, thread_name_prefix="fnq-sqlite-writer", initializer=batch_scheduling
        )
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="fnq-sqlite-reader")
        self._wconn: sqlite3.Connection | None = None
        self._writer_state: dict[str, str] = {}  # pragmas last set on _wconn
        self._rconn: sqlite3.Connection | None = None
        self._qconn: sqlite3.Connection | None = None  # point reads on the event loop
        self._migrating: sqlite3.Connection | None = None  # the writer's, while it opens
        self._stopping_open = threading.Event()  # set when the open is cancelled
        self.writer: GroupCommit[_Op] = GroupCommit(
            f"sqlite:{path.name}", self._run_batch, is_transient, splits_on=is_full
        )

    @classmethod
    async def open(
        cls, settings: Settings, logs: LogStore | None, *, create: bool = True
    ) -> SqliteDatastore:
        store = cls(settings, logs, path_from_url(settings.db_url))
        try:
            await store._start(create=create)
        except BaseException:
            await store.close()
            raise
        return store

    async def _start(self, *, create: bool) -> None:
        if not create and not self.path.exists():
            raise StoreError(
                f"no datastore at {self.path} (FN_DB_URL); a worker or `fnq fn create` creates it"
            )
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._writer_thread, self._open_writer)
        try:
            await asyncio.shield(opening)
        except asyncio.CancelledError:
            await self._stop_opening(opening)
            raise
        self._rconn = await loop.run_in_executor(
            self._reader_thread, lambda: connect(self.path, readonly=True)
        )
        self._qconn = await loop.run_in_executor(self._reader_thread, self._open_quick_reader)
        self.writer.start()

    def _open_quick_reader(self) -> sqlite3.Connection:
        conn = connect(self.path, readonly=True)
        conn.execute("PRAGMA busy_timeout = 0")  # never wait on the event loop: fall back
        return conn

    async def _stop_opening(self, opening: asyncio.Future[None]) -> None:
        """The open was cancelled (Ctrl-C, say) while the writer thread opens the file,
        which may be applying a schema version for minutes with the write lock held:
        stop that (it is rolled back, to be applied by the next open) and wait for
        the thread, at most ``close_timeout_s``."""
        loop = asyncio.get_running_loop()
        self._stopping_open.set()
        deadline = loop.time() + self.close_timeout_s
        while not opening.done() and loop.time() < deadline:
            conn = self._migrating
            if conn is not None:  # again each time: one made between two statements is lost
                with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile
                    conn.interrupt()
            await asyncio.wait({opening}, timeout=STOP_OPEN_POLL_S)
        if opening.done() and not opening.cancelled():
            opening.exception()  # the failure the stop caused: not news

    def _open_writer(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            create_private(self.path)
            conn = self._migrating = connect(self.path)
            migrate.apply_sqlite(conn, self._stopping_open)
            conn.execute("PRAGMA busy_timeout = 0")  # its transactions wait in begin_immediate
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error | OSError):  # OSError: its file or directory
                raise StoreUnavailable(  # cannot be made
                    f"cannot open the datastore {self.path}: {exc}{full_disk_note(self.path, exc)}"
                ) from exc
            raise
        finally:
            self._migrating = None
        self._wconn = conn
        self._writer_state = {"synchronous": "FULL"}  # as connect() leaves it

    async def _run_batch(self, ops: list[_Op]) -> list[Any]:
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable("the datastore is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._writer_thread, run_batch, conn, ops, self._writer_state
        )

    async def _write(self, kind: Write, params: dict[str, Any], log: bytes | None = None) -> Any:
        return await self.writer.submit((kind, params, log))

    async def _write_now(self, kind: Write, params: dict[str, Any]) -> Any:
        # On the writer thread, between two batches; waits for the file lock at most
        # BUSY_TIMEOUT_S and then fails instead of retrying.
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable("the datastore is not open")
        loop = asyncio.get_running_loop()
        ops: list[_Op] = [(kind, params, None)]
        try:
            [result] = await loop.run_in_executor(
                self._writer_thread, run_batch, conn, ops, self._writer_state
            )
        except sqlite3.Error as exc:
            if is_transient(exc):  # locked, a full disk, an I/O error
                raise StoreUnavailable(
                    f"the datastore {self.path} cannot be written now: {exc}"
                ) from exc
            raise StoreError(f"{kind.value} failed: {exc}") from exc
        if isinstance(result, Failed):
            raise result.error
        return result

    def _id_list(self, ids: Sequence[str]) -> Any:
        return json.dumps(list(ids))

    def _fn_keys(self, keys: Collection[tuple[str, str]]) -> dict[str, Any]:
        return {"keys": json.dumps([list(key) for key in keys])}

    def _walking(self, index: str) -> str:
        # Without statistics SQLite might walk an index whose calls are mostly not
        # those of the page: it is told which one.
        return f"calls INDEXED BY {index}"

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        conn = self._rconn
        if conn is None:
            raise StoreUnavailable("the datastore is not open")

        def read() -> list[dict[str, Any]]:
            return [_row(r) for r in conn.execute(query, encode(params)).fetchall()]

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader_thread, read)
        except sqlite3.Error as exc:
            if is_transient(exc):
                raise StoreUnavailable(
                    f"the datastore {self.path} cannot be read now: {exc}"
                ) from exc
            raise StoreError(f"reading the datastore failed: {exc}") from exc

    async def _fetch_one(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """A read of a few rows by their keys, on the event loop itself.

        In WAL mode a reader never waits for the writer, and a row just written
        is in the page cache, so this takes microseconds, against the hand-off to
        the reader thread and back (hundreds of microseconds on a busy host). In
        the rare moment when SQLite would make it wait (busy_timeout is 0 on this
        connection), the read goes to the reader thread instead.
        """
        conn = self._qconn
        if conn is None:
            raise StoreUnavailable("the datastore is not open")
        try:
            return [_row(r) for r in conn.execute(query, encode(params)).fetchall()]
        except sqlite3.Error as exc:
            if not is_transient(exc):
                raise StoreError(f"reading the datastore failed: {exc}") from exc
        return await self._fetch(query, params)

    async def _close_backend(self) -> None:
        await self.writer.close(self.close_timeout_s)
        loop = asyncio.get_running_loop()
        if self._qconn is not None:
            await loop.run_in_executor(self._reader_thread, self._qconn.close)
        pairs = ((self._writer_thread, self._wconn), (self._reader_thread, self._rconn))
        for executor, conn in pairs:
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)
        self._wconn = self._rconn = self._qconn = None
