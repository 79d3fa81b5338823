"""The live worker registry and the bulk cancel lookup, on every backend."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

import datastore.sqlite as sqlite_backend
from config.domain import Call, CallStatus, Outcome, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from datastore.common import SqlDatastore
from datastore.errors import StoreClosed, StoreUnavailable
from tests.datastore.conftest import MakeStore, fresh_pg_database
from tests.rig import PostgresServer, pg_tempdir

pytestmark = pytest.mark.integration

INFO = {
    "memory_mb_total": 4096, "memory_mb_used": 512, "cpu_mcpu_total": 4000,
    "cpu_mcpu_used": 250, "containers": 3, "calls_running": 2, "calls_waiting": 5,
    "version": "0.1.0",
}  # fmt: skip


async def test_heartbeat_upserts_and_lists(store: SqlDatastore) -> None:
    await store.worker_heartbeat("w-1", INFO)
    [first] = await store.list_workers(timedelta(seconds=30))
    assert (first.id, first.host, first.pid) == ("w-1", socket.gethostname(), os.getpid())
    assert first.info == INFO
    assert first.started_at == first.seen_at

    await asyncio.sleep(0.01)
    await store.worker_heartbeat("w-1", {**INFO, "calls_running": 0})
    [again] = await store.list_workers(timedelta(seconds=30))
    assert again.started_at == first.started_at  # kept from the first heartbeat
    assert again.seen_at > first.seen_at
    assert again.info == {**INFO, "calls_running": 0}

    # host and pid given by the caller; values JSON cannot hold become strings
    await store.worker_heartbeat("w-0", {"host": "box-2", "pid": 77, "odd": Path("/x")})
    listed = await store.list_workers(timedelta(seconds=30))
    assert [(w.host, w.id) for w in listed] == sorted([("box-2", "w-0"), (first.host, "w-1")])
    other = next(w for w in listed if w.id == "w-0")
    assert (other.pid, other.info) == (77, {"odd": "/x"})
    assert other.to_json()["info"] == {"odd": "/x"}

    await store.worker_gone("w-1")
    await store.worker_gone("w-1")  # gone already: nothing to do
    assert [w.id for w in await store.list_workers(timedelta(seconds=30))] == ["w-0"]


async def test_list_and_prune_by_age(store: SqlDatastore) -> None:
    await store.worker_heartbeat("old", {})
    await asyncio.sleep(0.2)
    await store.worker_heartbeat("new", {})
    assert [w.id for w in await store.list_workers(timedelta(seconds=0.1))] == ["new"]
    assert await store.prune_workers(timedelta(seconds=0.1)) == 1
    assert await store.prune_workers(timedelta(seconds=0.1)) == 0
    assert [w.id for w in await store.list_workers(timedelta(hours=1))] == ["new"]


async def test_registry_is_shared_between_stores(make_store: MakeStore) -> None:
    worker, cli = await make_store(), await make_store()
    await worker.worker_heartbeat("w-1", INFO)
    assert [w.info for w in await cli.list_workers(timedelta(seconds=30))] == [INFO]
    await worker.close()
    with pytest.raises(StoreClosed):
        await worker.worker_heartbeat("w-1", INFO)


async def test_cancel_requested_in_one_lookup(store: SqlDatastore) -> None:
    running = [Call(new_call_id(), "app", "fn") for _ in range(4)]
    for c in running:
        await store.record_running(c, 1, "w")
    await store.request_cancel(running[1].id)
    await store.request_cancel(running[3].id)
    queued = Call(new_call_id(), "app", "fn")
    await store.record_queued(queued)

    ids = [c.id for c in running] + [queued.id, new_call_id()]
    assert await store.cancel_requested(ids) == {running[1].id, running[3].id}
    # a worker with many calls: still one query
    many = [new_call_id() for _ in range(3000)] + [running[3].id]
    assert await store.cancel_requested(many) == {running[3].id}
    assert await store.cancel_requested([running[0].id]) == set()
    # a call a worker holds while its record is still `queued` (waiting for a
    # container), cancelled meanwhile: the worker must drop it too
    assert (await store.request_cancel(queued.id)).status is CallStatus.CANCELLED  # type: ignore[union-attr]
    assert await store.cancel_requested([queued.id, running[0].id]) == {queued.id}

    async def no_query(*_: object) -> None:
        raise AssertionError("queried")

    store._fetch = no_query  # type: ignore[assignment,method-assign]
    assert await store.cancel_requested([]) == set()


async def test_cancel_requested_after_the_call_ended(store: SqlDatastore) -> None:
    c = Call(new_call_id(), "app", "fn")
    await store.record_running(c, 1, "w")
    await store.request_cancel(c.id)
    await store.record_outcome(c, Outcome(CallStatus.CANCELLED), 1, "w")
    assert await store.cancel_requested([c.id]) == {c.id}


# ------------------------------------------------------------------ outages


async def test_sqlite_heartbeat_fails_fast_while_the_file_is_locked(
    tmp_path: Path, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "fnq.db"
    store = await open_datastore(load_settings(data_dir=tmp_path, db_url=f"sqlite:///{path}"))
    assert isinstance(store, SqlDatastore)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.worker_heartbeat("w-1", INFO)
        assert time.monotonic() - started < 3
    finally:
        other.execute("COMMIT")
        other.close()
    await store.worker_heartbeat("w-1", INFO)  # the next one goes through
    assert len(await store.list_workers(timedelta(seconds=30))) == 1
    await store.close()


async def test_postgres_heartbeat_fails_fast_while_the_server_is_down(
    tmp_path: Path, settings_env: Path
) -> None:
    server = PostgresServer(pg_tempdir(tmp_path)).start()
    try:
        url = await fresh_pg_database(server)
        store = await open_datastore(load_settings(data_dir=tmp_path / "data", db_url=url))
        assert isinstance(store, SqlDatastore)
        store.worker_write_timeout_s = 2.0
        await store.worker_heartbeat("w-1", INFO)
        await asyncio.to_thread(server.stop)
        started = time.monotonic()
        for call in (store.worker_heartbeat("w-1", INFO), store.worker_gone("w-1")):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - started < 5
        await store.close()
    finally:
        await asyncio.to_thread(server.stop)
