"""Writes wait out a database outage and then succeed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

import datastore.sqlite as sqlite_backend
from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from datastore.common import SqlDatastore
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PG_BIN, PostgresServer, pg_tempdir

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
        caplog.set_level(logging.WARNING, logger="datastore.batch")
        writes = asyncio.gather(*(store.record_outcome(c, outcome(), 1, "w") for c in calls))
        await wait_for(lambda: store.writer.in_outage)  # type: ignore[attr-defined]
        assert not writes.done()
        await asyncio.sleep(0.3)  # several retries happen meanwhile
        await asyncio.to_thread(start_again, server)

        async with asyncio.timeout(30):
            assert all(await writes)
        messages = [r.getMessage() for r in caplog.records if r.name == "datastore.batch"]
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
