"""Schema versions: numbering, concurrent startup, a schema newer than the code, and
upgrading a store in place."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import asyncpg
import pytest

from config.errors import StoreError
from config.sqlite import create_private
from datastore import migrate, postgres
from datastore import sqlite as sqlite_store
from datastore.base import CallFilter
from tests.datastore.conftest import MakeStore

pytestmark = pytest.mark.integration


def test_both_backends_share_the_numbering() -> None:
    sqlite_versions = [(m.version, m.name) for m in migrate.load("sqlite")]
    postgres_versions = [(m.version, m.name) for m in migrate.load("postgres")]
    assert sqlite_versions == postgres_versions
    assert sqlite_versions[0] == (1, "initial")


async def versions(db_url: str) -> list[int]:
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        rows = await conn.fetch("SELECT version FROM schema_version ORDER BY 1", timeout=10)
    finally:
        await conn.close(timeout=10)
    return [r[0] for r in rows]


async def test_concurrent_startup_applies_each_version_once(
    make_store: MakeStore, db_url: str
) -> None:
    stores = await asyncio.gather(*(make_store() for _ in range(4)))
    assert len(stores) == 4
    assert await versions(db_url) == [m.version for m in migrate.load("sqlite")]
    for store in stores:  # every one of them works
        assert await store.list_fns() == []


async def test_refuses_a_schema_newer_than_the_code(make_store: MakeStore, db_url: str) -> None:
    first = await make_store()
    await first.close()
    future = len(migrate.load("sqlite")) + 1
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            conn.execute("INSERT INTO schema_version VALUES (?, 'future', 'now')", (future,))
    else:
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            await conn.execute(
                "INSERT INTO schema_version VALUES ($1, 'future', 'now')", future, timeout=10
            )
        finally:
            await conn.close(timeout=10)
    with pytest.raises(StoreError, match="newer than this fnq knows"):
        await make_store()


def test_statements_split_at_line_ending_semicolons() -> None:
    m = migrate.Migration(
        1, "x", "-- comment; here\nCREATE TABLE a (x int);\nCREATE INDEX i ON a (x);\n"
    )
    assert m.statements() == ["CREATE TABLE a (x int)", "CREATE INDEX i ON a (x)"]


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement, timeout=30)
    finally:
        await conn.close(timeout=10)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_up_to_date_opens_on_a_read_only_server(
    make_store: MakeStore, db_url: str
) -> None:
    await (await make_store()).close()
    name = db_url.rsplit("/", 1)[1]
    await _admin(db_url, f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    store = await make_store()  # a standby: reads work
    assert await store.list_fns() == []


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_up_to_date_opens_for_a_role_without_create(
    make_store: MakeStore, db_url: str
) -> None:
    await (await make_store()).close()
    role = "r_" + db_url.rsplit("/", 1)[1]
    await _admin(
        db_url,
        f"CREATE ROLE {role} LOGIN",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
    )
    as_role = db_url.replace("://fnq@", f"://{role}@")
    store = await make_store(db_url=as_role)
    assert await store.list_fns() == []


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_schema_it_may_not_create_is_a_store_error(
    make_store: MakeStore, db_url: str
) -> None:
    role = "r_" + db_url.rsplit("/", 1)[1]
    await _admin(db_url, f"CREATE ROLE {role} LOGIN", "REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    with pytest.raises(StoreError, match=r"cannot update the schema .*permission denied"):
        await make_store(db_url=db_url.replace("://fnq@", f"://{role}@"))


# ------------------------------------------------- upgrading a store in place


async def at_version(db_url: str, version: int) -> None:
    """Make the database of ``db_url`` as an fnq of schema ``version`` left it."""
    if db_url.startswith("sqlite"):
        path = Path(db_url.removeprefix("sqlite://"))
        create_private(path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # as every fnq leaves it
            conn.execute(migrate._VERSION_TABLE)
            for m in migrate.load("sqlite")[:version]:
                for statement in m.statements():
                    conn.execute(statement)
                stamp = "INSERT INTO schema_version VALUES (?, ?, 'then')"
                conn.execute(stamp, (m.version, m.name))
        finally:
            conn.close()
        return
    statements = [migrate._VERSION_TABLE]
    for m in migrate.load("postgres")[:version]:
        stamp = f"INSERT INTO schema_version VALUES ({m.version}, '{m.name}', 'then')"
        statements += [m.sql, stamp]
    await _admin(db_url, *statements)


async def _indexes(db_url: str) -> set[str]:
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        return {r[0] for r in rows}
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        found = await conn.fetch("SELECT indexname FROM pg_indexes", timeout=10)
    finally:
        await conn.close(timeout=10)
    return {r[0] for r in found}


async def test_a_version_4_store_gains_the_app_index_and_keeps_its_calls(
    make_store: MakeStore, db_url: str
) -> None:
    await at_version(db_url, 4)
    assert "calls_by_app" not in await _indexes(db_url)
    rows = [(f"c{i:02d}", "shop" if i % 2 else "blog", i) for i in range(20)]
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            conn.executemany(
                "INSERT INTO calls (id, app, fn, status, created_at, updated_at)"
                " VALUES (?, ?, 'f', 'success', ?, 0)",
                [(i, app, 1_700_000_000_000_000 + t) for i, app, t in rows],
            )
    else:
        await _admin(db_url, *(
            "INSERT INTO calls (id, app, fn, status, created_at, updated_at) VALUES"
            f" ('{i}', '{app}', 'f', 'success', to_timestamp(1700000000 + {t}), now())"
            for i, app, t in rows
        ))  # fmt: skip
    store = await make_store()
    assert await versions(db_url) == [m.version for m in migrate.load("sqlite")]
    assert "calls_by_app" in await _indexes(db_url)
    page = await store.list_calls(CallFilter(app="shop", limit=5))
    assert [r.id for r in page.items] == ["c19", "c17", "c15", "c13", "c11"]


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_applies_a_version_that_takes_longer_than_a_statement(
    make_store: MakeStore, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index built on a large calls table takes minutes: the statement timeout of
    reads and writes (30 s) must not roll it back on every start."""
    shipped = migrate.load("postgres")
    slow = migrate.Migration(len(shipped) + 1, "slow", "SELECT pg_sleep(0.6)")
    monkeypatch.setattr(migrate, "load", lambda dialect: [*shipped, slow])
    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_S", 0.3)
    await make_store()
    assert (await versions(db_url))[-1] == slow.version


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_waits_for_another_process_applying_versions(
    make_store: MakeStore, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that starts while another applies a version waits for it to finish,
    however much longer than a write's usual wait for the lock that takes."""
    await at_version(db_url, len(migrate.load("sqlite")) - 1)
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.1)
    other = sqlite3.connect(db_url.removeprefix("sqlite://"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process applying the last version
        opening = asyncio.create_task(make_store())
        await asyncio.wait({opening}, timeout=0.5)  # five times the usual wait
        assert not opening.done(), opening
        other.execute("COMMIT")
        async with asyncio.timeout(10):
            await opening
    finally:
        other.close()
    assert await versions(db_url) == [m.version for m in migrate.load("sqlite")]


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_applies_past_the_servers_own_statement_timeout(
    make_store: MakeStore, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement_timeout set for the role, the database or in FN_DB_URL (a common
    guard) must not cancel an index build at the same point on every start."""
    shipped = migrate.load("postgres")
    slow = migrate.Migration(len(shipped) + 1, "slow", "SELECT pg_sleep(0.6)")
    monkeypatch.setattr(migrate, "load", lambda dialect: [*shipped, slow])
    await make_store(db_url=db_url + "?statement_timeout=200")
    assert (await versions(db_url))[-1] == slow.version


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_waits_for_another_migrator_past_the_servers_lock_timeout(
    make_store: MakeStore, db_url: str
) -> None:
    """A worker that starts while another applies a version waits for it, whatever
    lock_timeout the server gives its sessions."""
    await at_version(db_url, len(migrate.load("postgres")) - 1)
    other = await asyncpg.connect(db_url, timeout=10)
    try:
        applying = other.transaction()  # another process applying the last version
        await applying.start()
        await other.execute("SELECT pg_advisory_xact_lock($1)", migrate.PG_LOCK_KEY, timeout=10)
        opening = asyncio.create_task(make_store(db_url=db_url + "?lock_timeout=100"))
        await asyncio.wait({opening}, timeout=0.5)  # five times the server's lock_timeout
        assert not opening.done(), opening
        await applying.rollback()
        async with asyncio.timeout(10):
            await opening
    finally:
        await other.close(timeout=10)
    assert await versions(db_url) == [m.version for m in migrate.load("postgres")]


async def _backends_running(db_url: str, text: str) -> int:
    conn = await asyncpg.connect(db_url, timeout=10)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            f"%{text}%",
            timeout=10,
        )
    finally:
        await conn.close(timeout=10)
    return int(found)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_stops_applying_when_its_client_is_gone(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped while it applies a version (SIGTERM, SIGKILL: its socket
    closes, no cancel request is sent) must not leave the server building on, the
    calls table locked against every worker's writes, until the build ends."""
    shipped = migrate.load("postgres")
    await at_version(db_url, len(shipped) - 1)
    marker = "fnq_test_gone_client"
    long = migrate.Migration(len(shipped), "long", f"SELECT pg_sleep(60) AS {marker}")
    monkeypatch.setattr(migrate, "load", lambda dialect: [*shipped[:-1], long])
    conn = await asyncpg.connect(db_url, timeout=10)
    applying = asyncio.create_task(migrate.apply_postgres(conn, 10))
    try:
        async with asyncio.timeout(10):
            while not await _backends_running(db_url, marker):
                await asyncio.sleep(0.05)
        conn.terminate()  # the socket closes as a killed process's does
        async with asyncio.timeout(migrate.PG_CLIENT_CHECK_MS / 1000 + 5):
            while await _backends_running(db_url, marker):
                await asyncio.sleep(0.1)
    finally:
        applying.cancel()
        await asyncio.gather(applying, return_exceptions=True)
    assert await versions(db_url) == [m.version for m in shipped[:-1]]


def _write_lock_free(path: Path) -> bool:
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


# A statement that runs for minutes, as an index build on a large calls table does.
_COUNT_FOR_MINUTES = (
    "CREATE TABLE slow AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
    " WHERE x < 10000000000) SELECT count(*) AS n FROM c"
)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_open_cancelled_while_applying_stops_at_once(
    make_store: MakeStore, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C on a worker or command that applies a version: the build stops, the
    write lock is let go and the version is left unapplied, rather than the
    process waiting out the build and applying it after all."""
    shipped = migrate.load("sqlite")
    await at_version(db_url, len(shipped) - 1)
    path = Path(db_url.removeprefix("sqlite://"))
    long = migrate.Migration(len(shipped), "long", _COUNT_FOR_MINUTES + ";\n")
    monkeypatch.setattr(migrate, "load", lambda dialect: [*shipped[:-1], long])
    opening = asyncio.create_task(make_store())
    async with asyncio.timeout(10):
        while _write_lock_free(path):  # until the build holds the lock
            await asyncio.sleep(0.02)
    opening.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait({opening})
    assert opening.cancelled()
    assert _write_lock_free(path)
    assert await versions(db_url) == [m.version for m in shipped[:-1]]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_open_cancelled_while_waiting_for_another_migrator(
    make_store: MakeStore, db_url: str
) -> None:
    """Ctrl-C while another process applies versions ends the wait for it at once:
    no thread of the cancelled open waits on for the lock, to apply versions later."""
    await at_version(db_url, len(migrate.load("sqlite")) - 1)
    other = sqlite3.connect(db_url.removeprefix("sqlite://"), isolation_level=None)
    before = set(threading.enumerate())
    try:
        other.execute("BEGIN IMMEDIATE")  # another process applying the last version
        opening = asyncio.create_task(make_store())
        await asyncio.wait({opening}, timeout=0.3)
        assert not opening.done(), opening
        opening.cancel()
        async with asyncio.timeout(2):
            await asyncio.wait({opening})
        assert opening.cancelled()
        threads = set(threading.enumerate()) - before
        async with asyncio.timeout(2):
            while any(t.is_alive() for t in threads):
                await asyncio.sleep(0.02)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await versions(db_url) == [m.version for m in migrate.load("sqlite")][:-1]
