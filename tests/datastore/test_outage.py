"""Writes wait out a database outage and then succeed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import asyncpg
import pytest

import datastore.sqlite as sqlite_backend
from config.domain import Call, CallStatus, Outcome, Response, new_call_id, utcnow
from config.settings import load_settings, sqlite_url
from datastore import pgbatch
from datastore.base import open_datastore
from datastore.common import SqlDatastore
from datastore.errors import StoreUnavailable
from datastore.postgres import PostgresDatastore
from mq.base import open_queue
from mq.errors import QueueUnavailable
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PG_BIN, PostgresServer, fill_space, pg_tempdir, small_tmpfs

pytestmark = pytest.mark.integration


def outcome() -> Outcome:
    return Outcome(CallStatus.SUCCESS, response=Response(200, body=b"ok"), log=b"log")


async def wait_for(predicate: object, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def start_again(server: PostgresServer) -> None:
    """pg_ctl start on the existing data directory (the rig's start() would initdb)."""
    opts = (
        f"-p {server.port} -k {server.directory} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    server._run(str(PG_BIN / "pg_ctl"), "-D", str(server.directory / "data"), "-o", opts, "-w",
                "-l", str(server.directory / "pg.log"), "start")  # fmt: skip


async def test_postgres_outage_writes_wait_then_succeed(
    tmp_path: Path, settings_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PostgresServer(pg_tempdir(tmp_path)).start()
    try:
        url = await fresh_pg_database(server)
        settings = load_settings(data_dir=tmp_path / "data", db_url=url)
        store = await open_datastore(settings)
        assert isinstance(store, SqlDatastore)
        calls = [Call(new_call_id(), "app", "fn") for _ in range(20)]
        await store.record_running(calls[0], 1, "w")

        await asyncio.to_thread(server.stop)
        caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
        writes = asyncio.gather(*(store.record_outcome(c, outcome(), 1, "w") for c in calls))
        await wait_for(lambda: store.writer.in_outage)  # type: ignore[attr-defined]
        assert not writes.done()
        await asyncio.sleep(0.3)  # several retries happen meanwhile
        await asyncio.to_thread(start_again, server)

        async with asyncio.timeout(30):
            assert all(await writes)
        messages = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.batch"]
        assert len(messages) == 2, messages  # once when it started, once when it ended
        assert "unavailable" in messages[0] and "back" in messages[1]
        assert (await store.count_by_status())[CallStatus.SUCCESS] == 20
        await store.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_sqlite_lock_held_elsewhere_makes_writes_wait(
    tmp_path: Path, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_S", 0.1)
    path = tmp_path / "fnq.db"
    store = await open_datastore(load_settings(data_dir=tmp_path, db_url=f"sqlite:///{path}"))
    assert isinstance(store, sqlite_backend.SqliteDatastore)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holding the file
    try:
        c = Call(new_call_id(), "app", "fn")
        write = asyncio.ensure_future(store.record_outcome(c, outcome(), 1, "w"))
        await wait_for(lambda: store.writer.in_outage)
        assert not write.done()
    finally:
        other.execute("COMMIT")
        other.close()
    async with asyncio.timeout(10):
        assert await write is True
    assert not store.writer.in_outage
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.SUCCESS
    await store.close()


def empty_wal(path: Path) -> None:
    """Copy the -wal file of the SQLite database ``path`` into it and cut it to nothing:
    the next write must grow it, which a full disk refuses."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def test_sqlite_full_disk_makes_writes_wait_then_succeed(
    tmp_path: Path, settings_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The datastore's disk is full as calls end: their outcomes wait (the outage
    logged once), reads go on, and every outcome is stored once there is room."""
    with small_tmpfs(tmp_path / "db", "size=2m") as directory:
        path = directory / "fnq.db"
        store = await open_datastore(load_settings(db_url=sqlite_url(path)))
        calls = [Call(new_call_id(), "app", "fn", body=b"x" * 4096) for _ in range(20)]
        for c in calls:
            await store.record_queued(c)
        empty_wal(path)
        filler = fill_space(directory)
        caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
        writes = asyncio.gather(*(store.record_outcome(c, outcome(), 1, "w") for c in calls))
        await wait_for(lambda: store.writer.in_outage)  # type: ignore[attr-defined]
        assert (await store.count_by_status())[CallStatus.QUEUED] == 20  # reads work
        assert not writes.done()
        filler.unlink()
        async with asyncio.timeout(30):
            assert all(await writes)
        assert (await store.count_by_status())[CallStatus.SUCCESS] == 20
        await store.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.batch"]
    assert len(messages) == 2, messages
    assert "database or disk is full" in messages[0] and "back" in messages[1]


async def test_sqlite_disk_with_room_for_part_of_a_batch_takes_that_part(
    tmp_path: Path, settings_env: Path
) -> None:
    """After a long outage the outcomes waiting make one large batch; the room freed
    takes only some of them. Those are stored (the batch is halved until its parts
    fit) instead of the whole batch waiting for room it will not get."""
    with small_tmpfs(tmp_path / "db", "size=4m") as directory:
        path = directory / "fnq.db"
        store = await open_datastore(load_settings(db_url=sqlite_url(path)))
        calls = [Call(new_call_id(), "app", "fn") for _ in range(40)]
        for c in calls:
            await store.record_queued(c)
        empty_wal(path)
        filler = fill_space(directory)
        big = Outcome(CallStatus.SUCCESS, response=Response(200, body=b"r" * 65536))
        writes = asyncio.gather(*(store.record_outcome(c, big, 1, "w") for c in calls))
        await wait_for(lambda: store.writer.in_outage)  # type: ignore[attr-defined]
        filler.write_bytes(filler.read_bytes()[: -512 * 1024])  # room for a few of them

        async def stored() -> int:
            return (await store.count_by_status())[CallStatus.SUCCESS]

        async with asyncio.timeout(20):
            while await stored() == 0:
                await asyncio.sleep(0.05)
        assert await stored() < 40 and not writes.done()
        filler.unlink()
        async with asyncio.timeout(30):
            assert all(await writes)
        assert await stored() == 40
        await store.close()


async def test_a_write_with_patience_gives_up_on_a_full_disk(
    tmp_path: Path, settings_env: Path
) -> None:
    """A command's writes (``write_patience_s``) fail with the reason once the disk has
    been full that long, instead of waiting without end; the store works again with
    room, and nothing of the write given up was made."""
    with small_tmpfs(tmp_path / "db", "size=2m") as directory:
        path = directory / "fnq.db"
        store = await open_datastore(load_settings(db_url=sqlite_url(path)), write_patience_s=0.5)
        empty_wal(path)
        filler = fill_space(directory)
        lost, kept = Call(new_call_id(), "app", "fn"), Call(new_call_id(), "app", "fn")
        started = asyncio.get_running_loop().time()
        with pytest.raises(
            StoreUnavailable, match=r"could not be written for 0\.[5-9] s .*disk is full"
        ):
            await store.record_queued(lost)
        assert asyncio.get_running_loop().time() - started < 5
        filler.unlink()
        await store.record_queued(kept)
        assert await store.get_call(lost.id) is None
        assert await store.get_call(kept.id) is not None
        await store.close()


# What asyncpg 0.29-0.32 raises on a connection whose server ended the session in
# the middle of a statement (seen with ``pg_ctl stop -m fast`` under load), when the
# next statement, or the reset as the pool takes the connection back, comes before
# asyncpg has seen the socket close.
MID_STATEMENT = "cannot switch to state 12; another operation (2) is in progress"


async def open_pg(postgres_server: PostgresServer, data: Path) -> PostgresDatastore:
    url = await fresh_pg_database(postgres_server)
    store = await open_datastore(load_settings(data_dir=data, db_url=url))
    assert isinstance(store, PostgresDatastore)
    return store


async def test_postgres_connection_left_mid_statement_is_an_outage(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outcome of a call is not lost to asyncpg's error for a broken connection:
    the batch is tried again, on another connection, as in any outage."""
    store = await open_pg(postgres_server, tmp_path / "data")
    real_run = pgbatch.run
    failures = [asyncpg.exceptions.InternalClientError(MID_STATEMENT)]

    async def broken_once(conn: object, *args: object) -> list[object]:
        if failures:
            conn.terminate()  # type: ignore[attr-defined]
            raise failures.pop()
        return await real_run(conn, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pgbatch, "run", broken_once)
    caplog.set_level(logging.WARNING, logger="fnq.datastore.batch")
    c = Call(new_call_id(), "app", "fn")
    async with asyncio.timeout(10):
        assert await store.record_outcome(c, outcome(), 1, "w") is True
    assert not failures
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.SUCCESS
    messages = [r.getMessage() for r in caplog.records if r.name == "fnq.datastore.batch"]
    assert "InternalClientError" in messages[0] and "back" in messages[1], messages
    await store.close()


async def test_postgres_connection_that_cannot_be_reset_keeps_the_commit(
    postgres_server: PostgresServer, tmp_path: Path, settings_env: Path
) -> None:
    """A connection the pool fails to reset after a batch committed on it: the writes
    stand and their callers hear so; the next write gets another connection."""
    store = await open_pg(postgres_server, tmp_path / "data")
    failures = [asyncpg.exceptions.InternalClientError(MID_STATEMENT)]

    class ResetFailsOnce:
        def __init__(self, pool: asyncpg.Pool) -> None:
            self.pool = pool

        async def release(self, conn: asyncpg.Connection, *, timeout: float) -> None:
            if failures:  # as asyncpg's pool does when the reset fails: drop it, raise
                conn.terminate()
                await self.pool.release(conn, timeout=timeout)
                raise failures.pop()
            await self.pool.release(conn, timeout=timeout)

        def __getattr__(self, name: str) -> object:
            return getattr(self.pool, name)

    store._pool = ResetFailsOnce(store._pool)
    calls = [Call(new_call_id(), "app", "fn") for _ in range(2)]
    async with asyncio.timeout(10):
        assert await store.record_outcome(calls[0], outcome(), 1, "w") is True
        assert not failures
        assert await store.record_outcome(calls[1], outcome(), 1, "w") is True
    for c in calls:
        rec = await store.get_call(c.id)
        assert rec is not None and rec.status is CallStatus.SUCCESS
    await store.close()


async def test_postgres_connection_goes_back_to_the_pool_as_it_is(
    postgres_server: PostgresServer, tmp_path: Path, settings_env: Path
) -> None:
    """No reset statement when a connection is given back (a round trip per use): its
    session settings stay. A transaction left open is still rolled back."""
    store = await open_pg(postgres_server, tmp_path / "data")
    async with store._connection() as conn:
        await conn.execute("SET application_name = 'fnq-kept'")
    async with store._connection() as conn:
        assert await conn.fetchval("SHOW application_name") == "fnq-kept"
        assert await conn.fetchval("SHOW TIME ZONE") == "UTC"
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    async with store._connection() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    c = Call(new_call_id(), "app", "fn")
    assert await store.record_outcome(c, outcome(), 1, "w") is True
    await store.close()


async def test_postgres_read_only_server_makes_writes_wait(
    postgres_server: PostgresServer, tmp_path: Path, settings_env: Path
) -> None:
    """A server that takes no writes for a while (a standby during a failover, read-only
    mode) is an outage: the call's outcome waits and is stored once it takes writes,
    instead of being refused (which would end the call `error`)."""
    store = await open_pg(postgres_server, tmp_path / "data")
    name = store.settings.db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(store.settings.db_url, timeout=10)
    try:
        await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        await store._pool.expire_connections()  # new sessions are read-only
        c = Call(new_call_id(), "app", "fn")
        write = asyncio.ensure_future(store.record_outcome(c, outcome(), 1, "w"))
        await wait_for(lambda: store.writer.in_outage)
        with pytest.raises(StoreUnavailable):
            await store.worker_heartbeat("w", {})
        assert not write.done()
        await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        await store._pool.expire_connections()
        async with asyncio.timeout(20):
            assert await write is True
    finally:
        await admin.close(timeout=10)
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.SUCCESS
    await store.close()


@pytest.mark.parametrize("attempt", [0, 2])
async def test_a_running_mark_whose_answer_was_lost_is_not_counted_twice(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    attempt: int,
) -> None:
    """The `running` mark commits, then the connection breaks before its answer comes
    (the server restarted, say): the batch is sent again, and the record still counts
    the attempt once."""
    store = await open_pg(postgres_server, tmp_path / "data")
    real_run = pgbatch.run
    lost = [asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")]

    async def answer_lost_once(conn: object, *args: object) -> list[object]:
        results = await real_run(conn, *args)  # type: ignore[arg-type]
        if lost:
            conn.terminate()  # type: ignore[attr-defined]
            raise lost.pop()
        return results

    c = Call(new_call_id(), "app", "fn")
    await store.record_queued(c)
    if attempt:
        await store.record_running(c, attempt - 1, "w0")
        await store.record_retry(c, outcome(), attempt - 1, utcnow())
    monkeypatch.setattr(pgbatch, "run", answer_lost_once)
    async with asyncio.timeout(10):
        rec = await store.record_running(c, attempt, "w")
    assert not lost
    expected = attempt or 1
    assert (rec.status, rec.attempts, rec.worker_id) == (CallStatus.RUNNING, expected, "w")
    stored = await store.get_call(c.id)
    assert stored is not None and stored.attempts == expected
    # The mark of another attempt (the next delivery, on any worker) counts again.
    monkeypatch.setattr(pgbatch, "run", real_run)
    again = await store.record_running(c, 0, "w2")
    assert again.attempts == expected + 1
    await store.close()


async def test_opening_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, settings_env: Path
) -> None:
    """With no process holding them open, the datastore's and the queue's -shm files
    are gone, and opening them on a full disk fails in SQLite's words as a "disk I/O
    error": the error says the file system is full."""
    with small_tmpfs(tmp_path / "db", "size=2m") as directory:
        settings = load_settings(
            db_url=sqlite_url(directory / "fnq.db"), mq_url=sqlite_url(directory / "mq.db")
        )
        await (await open_datastore(settings)).close()
        queue = open_queue(settings.mq_url, settings)
        await queue.stats()
        await queue.close()
        fill_space(directory)
        with pytest.raises(StoreUnavailable, match=r"\(its file system is full\)$"):
            await open_datastore(settings)
        queue = open_queue(settings.mq_url, settings, create=False)
        try:
            with pytest.raises(QueueUnavailable, match=r"\(its file system is full\)$"):
                await queue.stats()
        finally:
            await queue.close()
