"""The datastore's clock (datastore.clock): every stored time is read from it, so
that hosts whose wall clocks disagree, or step, store and compare times alike.

A host's wall clock is moved here by patching ``time.time_ns``, which fnq reads it
through (config.domain.utcnow); PostgreSQL keeps the true one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, Function, Outcome, new_call_id, utcnow
from config.settings import load_settings
from datastore.base import Datastore, open_datastore
from datastore.clock import StoreClock
from datastore.common import SqlDatastore
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PostgresServer

HOUR_NS = 3600 * 10**9
_real_time_ns = time.time_ns


def true_now() -> datetime:
    return datetime.fromtimestamp(_real_time_ns() / 1e9, UTC)


def host_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """A setter of this host's wall clock: so many seconds off the true one."""

    def off_by(seconds: float) -> None:
        offset = int(seconds * 1e9)
        monkeypatch.setattr(time, "time_ns", lambda: _real_time_ns() + offset)

    return off_by


def near(when: datetime | None, to: datetime, within_s: float = 5.0) -> bool:
    return when is not None and abs((when - to).total_seconds()) < within_s


@pytest.fixture
async def pg_store(
    postgres_server: PostgresServer, settings_env: Path
) -> AsyncIterator[Callable[[], Awaitable[Datastore]]]:
    """Open a store on a new PostgreSQL database (once the test has set the clock)."""
    url = await fresh_pg_database(postgres_server)
    opened: list[Datastore] = []

    async def make() -> Datastore:
        opened.append(await open_datastore(load_settings(data_dir=settings_env, db_url=url)))
        return opened[-1]

    yield make
    for store in opened:
        await store.close()


async def test_a_store_opened_on_a_host_an_hour_ahead_stores_postgresqls_times(
    monkeypatch: pytest.MonkeyPatch, pg_store: Callable[[], Awaitable[Datastore]]
) -> None:
    call_id = new_call_id()  # ids made an hour ahead would stay ahead in this process
    host_clock(monkeypatch)(3600)
    store = await pg_store()
    assert store.clock.read
    assert -3605 < store.clock.ahead_of_host().total_seconds() < -3595
    fn = await store.create_fn(Function(app="a", name="f", image="img"))
    assert near(fn.created_at, true_now()) and near(fn.updated_at, true_now())
    call = Call(call_id, "a", "f", created_at=store.clock.now())
    await store.record_queued(call)
    running = await store.record_running(call, 0, "w")
    assert near(running.started_at, true_now()) and near(running.updated_at, true_now())
    ended = Outcome(CallStatus.SUCCESS, started_at=store.clock.now(), completed_at=None)
    await store.record_outcome(call, ended, 1, "w")
    rec = await store.get_call(call.id)
    assert rec is not None and near(rec.completed_at, true_now())
    await store.worker_heartbeat("w", {})
    [seen] = await store.list_workers(timedelta(seconds=30))
    assert near(seen.seen_at, true_now())
    assert await store.purge_calls(timedelta(minutes=30)) == 0  # ended just now
    assert await store.prune_workers(timedelta(minutes=30)) == 0  # seen just now


async def test_a_store_reads_the_servers_clock_again_and_carries_it_across_a_host_step(
    monkeypatch: pytest.MonkeyPatch, pg_store: Callable[[], Awaitable[Datastore]]
) -> None:
    off_by = host_clock(monkeypatch)
    store = await pg_store()
    off_by(-3600)  # the host's clock steps an hour back: the store's does not
    assert near(store.clock.now(), true_now(), 1.0)
    await store.read_clock()
    assert near(store.clock.now(), true_now(), 1.0)
    assert -3601 < -store.clock.ahead_of_host().total_seconds() < -3599


async def test_each_definition_is_newer_than_the_one_it_replaces_whatever_the_clock(
    monkeypatch: pytest.MonkeyPatch, store: SqlDatastore
) -> None:
    """The host's clock steps an hour back between two changes of a function (on
    SQLite the datastore's clock is the host's): the second is still the newer."""
    off_by = host_clock(monkeypatch)
    first = await store.create_fn(Function(app="a", name="f", image="img:1"))
    second = await store.update_fn("a", "f", image="img:2")
    off_by(-3600)
    third = await store.update_fn("a", "f", image="img:3")
    assert first.updated_at is not None and second.updated_at is not None
    assert third.updated_at is not None
    assert first.updated_at <= second.updated_at < third.updated_at
    stored = await store.get_fn("a", "f")
    assert stored is not None and stored.updated_at == third.updated_at


def test_a_host_clock_within_the_round_trip_of_the_servers_is_taken_as_it() -> None:
    """On the server's own host (or one in step with it) the reading is the host's:
    the times stored and those read from the host's clock then agree exactly, not
    only to half a slow round trip. A server clock out of that span is the server's."""
    clock = StoreClock()
    sent_s = time.monotonic() - 0.050  # a round trip of 50 ms on a busy host
    answered_s = time.monotonic()
    server_at = utcnow() - timedelta(milliseconds=40)  # read early in the round trip
    clock.set(server_at, sent_s, answered_s)
    assert abs(clock.now() - utcnow()) < timedelta(milliseconds=1)

    clock.set(utcnow() + timedelta(seconds=2), time.monotonic() - 0.010, time.monotonic())
    ahead = clock.ahead_of_host()
    assert timedelta(seconds=1.99) < ahead < timedelta(seconds=2.01)
