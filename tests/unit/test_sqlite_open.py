"""Several processes' connections opening one SQLite file, and taking its write lock."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, Function
from config.settings import Settings
from config.sqlite import begin_immediate, enable_wal
from datastore.sqlite import SqliteDatastore, connect
from mq.sqlite import SqliteQueue
from mq.sqlite_db import SqliteDb

DB_FILES = ("fnq.db", "mq.db")


def _open_all(path: Path, n: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def opener() -> None:
        conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
        try:
            start.wait(timeout=5)
            enable_wal(conn, 5.0)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return errors


def test_concurrent_openers_of_a_fresh_file_all_get_wal(tmp_path: Path) -> None:
    for round_ in range(25):
        errors = _open_all(tmp_path / f"db{round_}.sqlite", 6)
        assert errors == []


def test_a_lock_held_past_the_timeout_still_fails(tmp_path: Path) -> None:
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_wal(other, 0.05)
    finally:
        holder.execute("ROLLBACK")
        other.close()
        holder.close()


def _wal_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    enable_wal(conn, 5.0)
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return conn


def test_a_writer_gets_the_lock_within_a_millisecond_or_so_of_its_release(
    tmp_path: Path,
) -> None:
    path = tmp_path / "two.sqlite"
    holder = _wal_db(path)
    holder.execute("PRAGMA synchronous = OFF")  # its commit is over at once: no disk flush
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released_at: list[float] = []

    def release_later() -> None:
        time.sleep(0.135)  # SQLite's own handler tries at 128 ms, then at 178 ms
        holder.execute("INSERT INTO t VALUES (1)")
        holder.execute("COMMIT")
        released_at.append(time.monotonic())

    thread = threading.Thread(target=release_later)
    thread.start()
    try:
        begin_immediate(waiter, 5.0)
        got_at = time.monotonic()
        assert waiter.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1  # after the commit
        waiter.execute("COMMIT")
    finally:
        thread.join(timeout=5)
        waiter.close()
        holder.close()
    # Tried every 1 ms at most once the lock is held a while: a few ms, some more
    # on a loaded host; SQLite's handler would try next 43 ms after the release.
    assert got_at - released_at[0] < 0.03


def test_begin_immediate_gives_up_after_its_patience(tmp_path: Path) -> None:
    path = tmp_path / "held2.sqlite"
    holder = _wal_db(path)
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            begin_immediate(waiter, 0.05)
        assert 0.05 <= time.monotonic() - started < 1.0
        assert not waiter.in_transaction
    finally:
        holder.execute("ROLLBACK")
        waiter.close()
        holder.close()


def test_begin_immediate_raises_other_errors_at_once(tmp_path: Path) -> None:
    conn = _wal_db(tmp_path / "nested.sqlite")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # a transaction is already open: not a lock, so no waiting
        with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
            begin_immediate(conn, 5.0)
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _queue_conn(path: Path) -> sqlite3.Connection:
    db = SqliteDb(
        path, reservation_ms=30_000, max_deliveries=3, max_body_bytes=1024, busy_timeout_ms=5000
    )
    return db.conn


def _store_conn(path: Path) -> sqlite3.Connection:
    return connect(path)


@pytest.mark.parametrize("open_writer", [_queue_conn, _store_conn], ids=["queue", "store"])
def test_the_wal_file_shrinks_back_after_a_long_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_writer: Any
) -> None:
    """While a reader holds a transaction the -wal file grows; once it is done, the
    writers' next commits cut it back instead of keeping it at that size."""
    limit = 256 * 1024
    monkeypatch.setattr("config.sqlite.WAL_SIZE_LIMIT_BYTES", limit, raising=False)
    path = tmp_path / "grow.db"
    writer = open_writer(path)
    writer.execute("CREATE TABLE scratch (x BLOB)")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM scratch").fetchone()
    for _ in range(400):
        writer.execute("INSERT INTO scratch VALUES (zeroblob(8000))")
        writer.execute("DELETE FROM scratch")
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 4 * limit
    reader.execute("COMMIT")
    reader.close()
    for _ in range(50):
        writer.execute("INSERT INTO scratch VALUES (zeroblob(100))")
    assert wal.stat().st_size <= limit
    writer.close()


async def test_the_files_fnq_makes_are_its_owners_only(tmp_path: Path) -> None:
    """A data dir fnq makes is 0700, and its SQLite files 0600 (the -wal and -shm
    files too), whatever the umask: they hold calls' bodies and functions' config."""
    data_dir = tmp_path / "data dir é"
    settings = Settings(data_dir=data_dir)
    old_umask = os.umask(0o022)
    queue = SqliteQueue(data_dir / "mq.db", settings)
    store = None
    try:
        await queue.push(Call("c1", "demo", "echo"))
        store = await SqliteDatastore.open(settings, None)
        made = sorted(p.name for p in data_dir.iterdir())  # while open: -wal, -shm too
        modes = {name: stat.S_IMODE((data_dir / name).stat().st_mode) for name in made}
    finally:
        os.umask(old_umask)
        if store is not None:
            await store.close()
        await queue.close()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert {"mq.db", "mq.db-wal", "mq.db-shm", "fnq.db", "fnq.db-wal"} <= set(made)
    assert modes == dict.fromkeys(made, 0o600)


def test_a_file_that_is_there_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    conn = connect(path)
    conn.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_opening_files_whose_write_lock_is_held_reads_them(tmp_path: Path) -> None:
    """A datastore or queue that is up to date opens and reads while another
    process holds the file's write lock (a long write, a `sqlite3` shell in a
    transaction): opening it takes no lock, as a WAL reader waits for none."""
    settings = Settings(data_dir=tmp_path)
    store = await SqliteDatastore.open(settings, None)
    await store.create_fn(Function(app="a", name="f", image="img/f"))
    await store.close()
    queue = SqliteQueue(tmp_path / "mq.db", settings, busy_timeout_ms=200)
    await queue.push(Call("c1", "a", "f"))
    await queue.close()
    holders = [sqlite3.connect(tmp_path / name, isolation_level=None) for name in DB_FILES]
    for holder in holders:
        holder.execute("BEGIN IMMEDIATE")
    try:
        async with asyncio.timeout(3):  # the datastore's busy timeout is 5 s
            store = await SqliteDatastore.open(settings, None, create=False)
            try:
                assert [fn.name for fn in await store.list_fns()] == ["f"]
            finally:
                await store.close()
            queue = SqliteQueue(tmp_path / "mq.db", settings, busy_timeout_ms=200, create=False)
            try:
                assert (await queue.stats()).ready == 1
            finally:
                await queue.close()
    finally:
        for holder in holders:
            holder.execute("ROLLBACK")
            holder.close()
