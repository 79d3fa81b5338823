"""The shared datastore: PostgreSQL through an asyncpg pool, for many hosts.

Writes go through group commit like every backend: one pooled connection runs
each batch in a single transaction, the call writes of a batch as one
set-based statement per kind (``datastore.pgbatch``). If one write in a batch
is refused by the database (a constraint, a bad value), the batch is rolled
back and its writes are run again one transaction each, so only that write
fails. A lost
connection or a server that refuses connections is an outage: the batch is
retried with backoff until the server is back. So is asyncpg's
``InternalClientError`` ("cannot switch to state ...; another operation is in
progress"): asyncpg raises it on a connection whose server ended the session
mid-statement (``pg_ctl stop -m fast``) before it saw the socket close, and
its pool drops that connection. Giving a connection back to the pool fails
the same way at times; the work done on it stands (a batch's commit has
returned by then), and the pool drops the connection. A server that is read-only
(a standby the URL reaches during a failover, ``default_transaction_read_only``)
is an outage too: writes wait until it takes them again.

Every statement carries ``STATEMENT_TIMEOUT_S``; taking a connection from the
pool waits at most ``ACQUIRE_TIMEOUT_S``.

A silent network (packets dropped, no reset: a partition between hosts) is
noticed on both ends. This end gives a connection up once nothing has come
from the server's host for ``DEAD_AFTER_S`` (config.tcp), so a statement on
it fails as an outage then, not at its timeout. The server ends fnq's
sessions whose client is gone (``SESSION_SETTINGS``): one idle inside a
transaction for ``IDLE_IN_TRANSACTION_S`` (whose client never sent the rest:
it holds its rows locked, and every worker that writes the records of those
calls would wait on them until the server's TCP keepalive gave up on it, two
hours by default), and an idle one whose client's host stops answering
keepalive probes. A setting of the same name in FN_DB_URL's options wins.

Plans: asyncpg prepares each statement once per connection, and after five
runs the server may keep one generic plan for it. On a new database that plan
is made while the calls table holds a handful of rows, and reading records by
id then scans the whole table, on every read of that connection, until
autovacuum's first ANALYZE (up to a minute later, the table large by then). So
a connection made while the table is under ``SMALL_CALLS_BYTES`` plans each
statement for its own arguments (``plan_cache_mode = force_custom_plan``): a
little planning per statement instead. Connections made once the table has
grown keep the generic plans, which are then index scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from config.errors import ConfigError, FnqError, reason_of
from config.settings import Settings, mask_url
from config.tcp import dead_after
from datastore import migrate, pgbatch, sql
from datastore.backend import Write
from datastore.base import LogStore
from datastore.batch import Failed, GroupCommit
from datastore.clock import StoreClock
from datastore.common import SqlDatastore
from datastore.errors import StoreError, StoreUnavailable

CONNECT_TIMEOUT_S = 10.0
ACQUIRE_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 30.0
DEAD_AFTER_S = 10.0  # a connection that hears nothing from the server's host for this long
IDLE_IN_TRANSACTION_S = 10  # a session idle inside a transaction, at most
# The server's settings for fnq's sessions (see "A silent network" above).
SESSION_SETTINGS = {
    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_S * 1000),
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
POOL_MAX_SIZE = 4
# A batch holds at most this many bytes of bodies and logs (but at least one write): a
# batch goes as one statement per kind, which must reach the server and commit within
# STATEMENT_TIMEOUT_S, or it would time out, as an outage, again on every try.
MAX_BATCH_BYTES = 16 * 1024 * 1024
# A connection made while the calls table is smaller than this plans every statement
# for its arguments (see "Plans" above).
SMALL_CALLS_BYTES = 1024 * 1024
_CALLS_SIZE = "SELECT pg_relation_size(to_regclass('calls'))"
_CUSTOM_PLANS = "SET plan_cache_mode = force_custom_plan"
UNDEFINED_OBJECT = "42704"  # SQLSTATE of "unrecognized configuration parameter"
INVALID_PARAMETER_VALUE = "22023"

log = logging.getLogger("fnq.datastore.postgres")

_Op = tuple[Write, dict[str, Any], bytes | None]

_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InternalClientError,  # a connection left mid-statement (see above)
    # A server that takes no writes now (a standby, mid-failover, read-only mode): the
    # write is not refused for what it holds, it waits for a server that takes it.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)
# What asyncpg raises on a connection: the server's errors, the client's own.
_CLIENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# ... and what talking to the server may raise besides.
_FAILURES: tuple[type[Exception], ...] = (*_CLIENT_ERRORS, OSError, TimeoutError)


def op_bytes(op: _Op) -> int:
    """The bulk of a write: its bodies and log."""
    _, params, log = op
    size = len(log) if log else 0
    for key in ("response_body", "request_body", "data"):
        value = params.get(key)
        if isinstance(value, bytes | bytearray | memoryview):
            size += len(value)
    return size


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, _OUTAGE_TYPES):
        return True
    # "connection is closed" and the like; a DataError is a bad value, not an outage
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(
        exc, asyncpg.exceptions.DataError
    )


# One round trip each, where SQLite runs two statements (rows written by a
# data-modifying CTE are not visible to the outer SELECT, hence the UNION).
RUNNING_RETURNING = (
    f"WITH up AS ({sql.CALL_RUNNING} RETURNING {sql.RECORD_SELECT}) SELECT * FROM up UNION ALL"
    f" SELECT {sql.RECORD_SELECT} FROM calls WHERE id = :id AND NOT EXISTS (SELECT 1 FROM up)"
)
# Back to queued and the old log gone, in one statement.
REQUEUE = (
    f"WITH up AS ({sql.CALL_REQUEUE}), gone AS (DELETE FROM logs WHERE call_id IN"
    " (SELECT id FROM up)) SELECT id FROM up"
)

# Ended calls older than the cutoff, oldest first, a chunk at a time: the chunk's ids
# come from the completion index and go to the delete as an array, so each chunk
# costs index lookups (``id IN (SELECT ...)`` joins the whole table to the chunk:
# a scan of every row per chunk, a purge quadratic in the table's size).
PURGE = (
    "DELETE FROM calls WHERE id = ANY(ARRAY(SELECT id FROM calls"
    f" WHERE status IN {sql.FINAL} AND completed_at < :cutoff ORDER BY completed_at"
    " LIMIT :limit)) RETURNING id"
)

PURGE_IDS = sql.PURGE_IDS.format(ids_in="= ANY(:ids)")


def with_log(stmt: str) -> str:
    """``stmt`` (an upsert returning id) plus the log of the row it wrote."""
    return (
        f"WITH done AS ({stmt}), stored AS (INSERT INTO logs (call_id, data)"
        " SELECT id, :data FROM done ON CONFLICT (call_id) DO UPDATE SET data = excluded.data)"
        " SELECT id FROM done"
    )


_compiled: dict[str, tuple[str, tuple[str, ...]]] = {}


def compiled(query: str) -> tuple[str, tuple[str, ...]]:
    found = _compiled.get(query)
    if found is None:
        found = _compiled[query] = sql.numbered(query)
    return found


def args(query: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    text, names = compiled(query)
    return text, [params[name] for name in names]


async def _execute(conn: Any, query: str, params: dict[str, Any]) -> str:
    text, values = args(query, params)
    status: str = await conn.execute(text, *values, timeout=STATEMENT_TIMEOUT_S)
    return status


async def _fetch(conn: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    text, values = args(query, params)
    rows = await conn.fetch(text, *values, timeout=STATEMENT_TIMEOUT_S)
    return [dict(row) for row in rows]


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


# Writes that are one plain statement: those reporting whether they changed a row,
# and those reporting nothing.
_CHANGED_ONE = {Write.FN_INSERT: sql.FN_INSERT, Write.FN_UPDATE: sql.FN_UPDATE,
                Write.FN_DELETE: sql.FN_DELETE, Write.WORKER_GONE: sql.WORKER_GONE,
                Write.END_BURIED: sql.CALL_END_BURIED}  # fmt: skip
_PLAIN = {Write.QUEUED: sql.CALL_QUEUED, Write.LOG_PUT: sql.LOG_PUT,
          Write.WORKER_BEAT: sql.WORKER_BEAT}  # fmt: skip


async def apply(conn: Any, kind: Write, p: dict[str, Any], log: bytes | None) -> Any:
    """One write on its own (the batch path is ``pgbatch``); the result ``Write`` documents."""
    if kind in _CHANGED_ONE:
        return _count(await _execute(conn, _CHANGED_ONE[kind], p)) == 1
    if kind in _PLAIN:
        await _execute(conn, _PLAIN[kind], p)
        return None
    if kind is Write.RUNNING:
        return (await _fetch(conn, RUNNING_RETURNING, p))[0]
    if kind in (Write.FINISH, Write.RETRY):
        keep_log = bool(p.get("keep_log"))
        stmt = sql.CALL_FINISH if kind is Write.FINISH else sql.CALL_RETRY[keep_log]
        if log is None:
            return bool(await _fetch(conn, stmt, p))
        return bool(await _fetch(conn, with_log(stmt), {**p, "data": log}))
    if kind is Write.CANCEL:
        await _execute(conn, sql.CALL_CANCEL_QUEUED, p)
        await _execute(conn, sql.CALL_CANCEL_RUNNING, p)
        rows = await _fetch(conn, sql.CALL_GET_RECORD, {"id": p["id"]})
        return rows[0] if rows else None
    if kind is Write.REQUEUE:
        return bool(await _fetch(conn, REQUEUE, p))
    if kind is Write.PURGE:
        return [row["id"] for row in await _fetch(conn, PURGE, p)]
    if kind is Write.PURGE_IDS:
        return [row["id"] for row in await _fetch(conn, PURGE_IDS, p)]
    if kind is Write.LOG_DELETE:
        await conn.execute(
            "DELETE FROM logs WHERE call_id = ANY($1)", p["call_ids"], timeout=STATEMENT_TIMEOUT_S
        )
        return None
    if kind is Write.WORKER_PRUNE:
        return _count(await _execute(conn, sql.WORKER_PRUNE, p))
    raise AssertionError(f"unknown write {kind}")


# The URL query options asyncpg takes itself; it sends any other to the server
# as a setting (application_name, search_path, statement_timeout, ...).
ASYNCPG_URL_OPTIONS = (
    "host", "port", "dbname", "database", "user", "password", "passfile", "service",
    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslpassword", "sslnegotiation",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
    "krbsrvname", "gsslib",
)  # fmt: skip


def url_problem(url: str) -> str | None:
    """What asyncpg would fail on in ``url`` with a ValueError, OverflowError or
    IndexError instead of its own error, or read otherwise than written: a port
    that is not a number from 1 to 65535 (in the host list or ``?port=``), an empty
    entry in the host list, text after ``[IPv6]`` that is not ``:PORT`` (dropped),
    an option that is not ``NAME=VALUE``."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return str(exc)
    ports = []
    netloc = parts.netloc
    hostlist = netloc.partition("@")[2] if "@" in netloc else netloc  # the first '@', as asyncpg
    for spec in hostlist.split(",") if hostlist else ():
        if not spec:
            return f"the host list {hostlist!r} has an empty entry"
        if spec.startswith("["):  # [IPv6]:PORT
            rest = spec.partition("]")[2]
            if rest and not rest.startswith(":"):
                return f"host {spec!r} is not [IPv6 address]:PORT"
            ports.append(rest[1:])
        else:
            ports.append(spec.partition(":")[2])
    try:  # asyncpg reads the query strictly: every field NAME=VALUE
        query = parse_qsl(parts.query, strict_parsing=bool(parts.query))
    except ValueError:
        return f"the options {parts.query!r} are not NAME=VALUE&..."
    for name, value in query:
        if name == "port":
            ports.extend(value.split(","))
    for port in (unquote(p) for p in ports if p):
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} is not a number from 1 to 65535"
    return None


def _refused(url: str, exc: asyncpg.PostgresError) -> FnqError:
    """The error for a server that refused the connection: a URL option or the login."""
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if f'"{name}"' not in str(exc) or name in ASYNCPG_URL_OPTIONS:
            continue
        if exc.sqlstate == UNDEFINED_OBJECT:
            return ConfigError(
                f"FN_DB_URL: unknown option {name!r}: PostgreSQL has no setting of that name,"
                f" and asyncpg takes {', '.join(ASYNCPG_URL_OPTIONS)}"
            )
        if exc.sqlstate == INVALID_PARAMETER_VALUE:
            return ConfigError(f"FN_DB_URL: option {name}={value!r}: {exc}")
    where = mask_url(url).split("?", 1)[0]  # without the options
    return StoreError(f"the PostgreSQL datastore {where} refused the connection: {exc}")


def session_settings(url: str) -> dict[str, str]:
    """``SESSION_SETTINGS`` but those that ``url``'s options set themselves."""
    given = {name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    return {name: value for name, value in SESSION_SETTINGS.items() if name not in given}


async def _init_connection(conn: Any) -> None:
    # asyncpg has no public way to its socket; without it, the statement timeouts
    # still bound every wait.
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        dead_after(transport, DEAD_AFTER_S)
    await conn.execute("SET TIME ZONE 'UTC'", timeout=STATEMENT_TIMEOUT_S)
    size = await conn.fetchval(_CALLS_SIZE, timeout=STATEMENT_TIMEOUT_S)
    if size is None or size < SMALL_CALLS_BYTES:
        # A server before PostgreSQL 12 has no such setting: generic plans there.
        with contextlib.suppress(asyncpg.exceptions.UndefinedObjectError):
            await conn.execute(_CUSTOM_PLANS, timeout=STATEMENT_TIMEOUT_S)


async def _read_clock(conn: Any, clock: StoreClock) -> None:
    """Set ``clock`` from the server's (datastore.clock)."""
    sent_s = time.monotonic()
    read_at = await conn.fetchval("SELECT clock_timestamp()", timeout=STATEMENT_TIMEOUT_S)
    clock.set(read_at.astimezone(UTC), sent_s, time.monotonic())


async def _keep_session(conn: Any) -> None:
    """How a connection goes back to the pool: as it is. asyncpg's own reset (advisory
    locks, cursors, LISTEN, settings) is one more round trip and statement for every
    use, and fnq's connections hold none of those: the migration lock is a
    transaction's, and the session settings are the ones ``_init_connection`` made.
    A transaction left open is still rolled back by the pool before this runs."""


class PostgresDatastore(SqlDatastore):
    def __init__(self, settings: Settings, logs: LogStore | None, pool: Any) -> None:
        super().__init__(settings, logs)
        self._pool = pool
        self.writer: GroupCommit[_Op] = GroupCommit(
            "postgres",
            self._run_batch,
            is_outage,
            splits_on=lambda exc: isinstance(exc, asyncpg.exceptions.DiskFullError),
            size=op_bytes,
            max_bytes=MAX_BATCH_BYTES,
        )

    @classmethod
    async def open(cls, settings: Settings, logs: LogStore | None) -> PostgresDatastore:
        problem = url_problem(settings.db_url)
        if problem:
            raise ConfigError(f"FN_DB_URL: {problem}")
        try:
            url = settings.db_url.replace("postgresql+asyncpg://", "postgresql://")
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                pool = await asyncpg.create_pool(
                    url,
                    server_settings=session_settings(url),
                    min_size=0,  # no floor to restore: an outage is logged once, by us
                    max_size=POOL_MAX_SIZE,
                    timeout=CONNECT_TIMEOUT_S,
                    command_timeout=STATEMENT_TIMEOUT_S,
                    init=_init_connection,
                    reset=_keep_session,
                )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(
                f"cannot reach the PostgreSQL datastore: {reason_of(exc, CONNECT_TIMEOUT_S)}"
            ) from exc
        store = cls(settings, logs, pool)
        connected = False
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                connected = True
                await migrate.apply_postgres(conn, STATEMENT_TIMEOUT_S)
                await _read_clock(conn, store.clock)
        except BaseException as exc:
            await store._terminate_pool()
            # The first connection is made here (the pool starts empty).
            if isinstance(exc, asyncpg.exceptions.ClientConfigurationError):
                raise ConfigError(f"FN_DB_URL: {exc}") from exc
            if is_outage(exc):
                where = mask_url(settings.db_url)
                raise StoreUnavailable(
                    f"cannot reach the PostgreSQL datastore {where}: "
                    f"{reason_of(exc, CONNECT_TIMEOUT_S)}"
                ) from exc
            if not connected and isinstance(exc, asyncpg.PostgresError):
                raise _refused(settings.db_url, exc) from exc
            if isinstance(exc, asyncpg.PostgresError):  # bringing the schema up to date
                where = mask_url(settings.db_url).split("?", 1)[0]
                raise StoreError(
                    f"cannot update the schema of the PostgreSQL datastore {where}: {exc}"
                ) from exc
            raise
        store.writer.start()
        return store

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection. Failing to give it back does not fail the work done
        on it: asyncpg's pool drops a connection it cannot reset (see above)."""
        conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S)
        try:
            yield conn
        finally:
            try:
                await self._pool.release(conn, timeout=ACQUIRE_TIMEOUT_S)
            except _FAILURES as exc:
                log.info(
                    "postgres: a connection could not be reset, dropped it: %s",
                    reason_of(exc, ACQUIRE_TIMEOUT_S),
                )

    async def _run_batch(self, ops: list[_Op]) -> list[Any]:
        async with self._connection() as conn:
            try:
                if pgbatch.statements(ops) == 1:  # atomic on its own
                    return await pgbatch.run(conn, ops, apply, STATEMENT_TIMEOUT_S)
                async with conn.transaction():
                    return await pgbatch.run(conn, ops, apply, STATEMENT_TIMEOUT_S)
            except _CLIENT_ERRORS as exc:
                if is_outage(exc):
                    raise
            # One write spoiled the batch: run each alone so only that one fails.
            results: list[Any] = []
            for kind, p, log in ops:
                try:
                    async with conn.transaction():
                        results.append(await apply(conn, kind, p, log))
                except _CLIENT_ERRORS as exc:
                    if is_outage(exc):
                        raise
                    results.append(Failed(StoreError(f"{kind.value} failed: {exc}")))
            return results

    async def _write(self, kind: Write, params: dict[str, Any], log: bytes | None = None) -> Any:
        return await self.writer.submit((kind, params, log))

    async def read_clock(self) -> None:
        """Read the server's clock again (StoreUnavailable when it cannot be reached)."""
        try:
            async with self._connection() as conn:
                await _read_clock(conn, self.clock)
        except _FAILURES as exc:
            if is_outage(exc):
                raise StoreUnavailable(f"the PostgreSQL datastore is unavailable: {exc}") from exc
            raise StoreError(f"reading the datastore's clock failed: {exc}") from exc

    async def _write_now(self, kind: Write, params: dict[str, Any]) -> Any:
        try:
            async with self._connection() as conn:
                return await apply(conn, kind, params, None)
        except _FAILURES as exc:
            if is_outage(exc):
                raise StoreUnavailable(
                    f"the PostgreSQL datastore is unavailable: {reason_of(exc)}"
                ) from exc
            raise StoreError(f"{kind.value} failed: {exc}") from exc

    async def _fetch(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            async with self._connection() as conn:
                rows = await _fetch(conn, query, params)
        except _FAILURES as exc:
            if is_outage(exc):
                raise StoreUnavailable(
                    f"the PostgreSQL datastore is unavailable: {reason_of(exc)}"
                ) from exc
            raise StoreError(f"reading the datastore failed: {exc}") from exc
        for row in rows:
            for key in sql.TIME_COLUMNS.intersection(row):
                if row[key] is not None:
                    row[key] = row[key].astimezone(UTC)
        return rows

    async def _terminate_pool(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self.close_timeout_s)
        except TimeoutError:
            self._pool.terminate()

    async def _close_backend(self) -> None:
        try:
            await self.writer.close(self.close_timeout_s)
        finally:
            await self._terminate_pool()
