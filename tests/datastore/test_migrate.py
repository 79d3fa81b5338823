"""Schema versions: numbering, concurrent startup, a schema newer than the code."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest

from config.errors import StoreError
from datastore import migrate
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
