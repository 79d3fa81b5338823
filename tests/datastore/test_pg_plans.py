"""PostgreSQL: how a connection plans its statements, by the size of the calls table.

A connection made while the table is small plans each statement for its own
arguments; one made once the table has grown keeps the server's generic plans
(datastore.postgres, "Plans").
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, new_call_id, utcnow
from config.settings import load_settings
from datastore import postgres
from datastore.base import CallFilter, encode_cursor, open_datastore
from datastore.postgres import PostgresDatastore
from tests.datastore.conftest import fresh_pg_database
from tests.datastore.test_outage import outcome
from tests.rig import PostgresServer


async def _open(url: str, data: Path) -> PostgresDatastore:
    store = await open_datastore(load_settings(data_dir=data, db_url=url))
    assert isinstance(store, PostgresDatastore)
    return store


async def _mode(store: PostgresDatastore) -> str:
    async with store._connection() as conn:
        return str(await conn.fetchval("SHOW plan_cache_mode"))


async def test_a_new_database_plans_for_the_arguments(
    postgres_server: PostgresServer, tmp_path: Path, settings_env: Path
) -> None:
    store = await _open(await fresh_pg_database(postgres_server), tmp_path / "data")
    try:
        assert await _mode(store) == "force_custom_plan"
        c = Call(new_call_id(), "app", "fn")
        assert await store.record_outcome(c, outcome(), 1, "w") is True
        assert (await store.get_calls([c.id, "nope"])).keys() == {c.id}
    finally:
        await store.close()


async def test_a_grown_calls_table_keeps_generic_plans(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = await fresh_pg_database(postgres_server)
    await (await _open(url, tmp_path / "data")).close()  # the tables exist from here on
    monkeypatch.setattr(postgres, "SMALL_CALLS_BYTES", 0)  # any table counts as grown
    store = await _open(url, tmp_path / "data")
    try:
        assert await _mode(store) == "auto"
    finally:
        await store.close()


async def test_a_server_without_the_setting_keeps_its_plans(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PostgreSQL before 12 has no plan_cache_mode: the store works as before there.
    monkeypatch.setattr(postgres, "_CUSTOM_PLANS", "SET fnq_no_such_setting = on")
    store = await _open(await fresh_pg_database(postgres_server), tmp_path / "data")
    try:
        assert await _mode(store) == "auto"
        c = Call(new_call_id(), "app", "fn")
        assert await store.record_outcome(c, outcome(), 1, "w") is True
        assert (await store.get_calls([c.id])).keys() == {c.id}
    finally:
        await store.close()


async def test_a_purge_chunk_does_not_scan_the_calls_table(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each chunk of ``fnq calls purge`` reads its rows through indexes: a scan of the
    whole table per chunk made a purge of many calls quadratic."""
    store = await _open(await fresh_pg_database(postgres_server), tmp_path / "data")
    sent: list[tuple[str, dict[str, Any]]] = []
    real_fetch = postgres._fetch

    async def spy(conn: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if query.startswith("DELETE FROM calls"):
            sent.append((query, params))
        return await real_fetch(conn, query, params)

    monkeypatch.setattr(postgres, "_fetch", spy)
    try:
        async with store._connection() as conn:
            await conn.execute(
                "INSERT INTO calls (id, app, fn, status, created_at, completed_at, updated_at)"
                " SELECT md5(i::text), 'app', 'fn', 'success', t, t, now()"
                " FROM generate_series(1, 50000) i,"
                " LATERAL (SELECT now() - i * interval '1 min' - interval '30 s' AS t) x"
            )
            await conn.execute("ANALYZE calls")
        assert await store.purge_calls(timedelta(days=30)) == 50000 - 30 * 24 * 60 + 1  # i >= 43200
        query, params = sent[0]
        text, values = postgres.args(query, params)
        async with store._connection() as conn:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + text, *values))
        assert "Seq Scan" not in plan, plan
    finally:
        await store.close()


async def test_a_page_after_a_cursor_seeks_to_it(
    postgres_server: PostgresServer,
    tmp_path: Path,
    settings_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fnq calls list --cursor``: the page starts where the cursor points, through the
    index. With the position as an OR of two comparisons the server walked the index
    from the newest call down to the cursor, a page deep in the list costing seconds."""
    store = await _open(await fresh_pg_database(postgres_server), tmp_path / "data")
    sent: list[tuple[str, dict[str, Any]]] = []
    real_fetch = postgres._fetch

    async def spy(conn: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if query.startswith("SELECT") and "before_at" in params:
            sent.append((query, params))
        return await real_fetch(conn, query, params)

    monkeypatch.setattr(postgres, "_fetch", spy)
    try:
        async with store._connection() as conn:
            await conn.execute(
                "INSERT INTO calls (id, app, fn, status, created_at, updated_at)"
                " SELECT md5(i::text), 'app' || (i % 7), 'fn', 'success',"
                " now() - i * interval '1 min', now() FROM generate_series(1, 50000) i"
            )
            await conn.execute("ANALYZE calls")
        deep = encode_cursor(utcnow() - timedelta(days=30), "z")
        for f in (CallFilter(cursor=deep), CallFilter(app="app3", cursor=deep)):
            assert len((await store.list_calls(f)).items) == 30
        assert len(sent) == 2
        for query, params in sent:
            text, values = postgres.args(query, params)
            async with store._connection() as conn:
                plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + text, *values))
            assert re.search(r"Index Cond: .*created_at <=", plan), plan
    finally:
        await store.close()
