"""The PostgreSQL datastore restarted (``pg_ctl restart -m fast``, or stopped for a
while) in the middle of a burst, on a Redis queue.

The worker's writes wait for the database and land once it is back; a call's
message is acked only after its final record is stored. So a worker that dies
while the database is down has acked nothing it has not recorded: the next
worker runs what it held, and no call is lost.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from config.domain import CallStatus
from tests.chaos.conftest import Chaos, burst, finals, make_chaos, running_on
from tests.rig import PostgresServer, RedisServer, pg_tempdir


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(pg_tempdir(tmp_path)).start()
    yield server
    server.stop()


async def under_way(chaos: Chaos, ids: list[str], sleep_ids: set[str]) -> None:
    worker = chaos.workers[-1]
    await chaos.wait(
        ids,
        lambda r: finals(r) >= 40 and len(running_on(r, worker) & sleep_ids) >= 2,
        "under way (40 final, two sleep calls running)",
    )


async def test_records_are_written_once_postgres_is_back_from_a_restart(
    tmp_path: Path, redis_server: RedisServer, pg: PostgresServer, images: None
) -> None:
    chaos = make_chaos(tmp_path, "redis", redis_server, pg.url)
    try:
        await chaos.register()
        b = burst(echo=200, sleep=20)
        await chaos.enqueue(b.calls)
        worker = chaos.start(metrics=True)
        await under_way(chaos, b.ids, {c.id for c in b.sleep})
        pg.restart()
        done = await chaos.wait_final(b.ids, timeout_s=60)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        assert {r.attempts for r in done.values()} == {1}, "a call ran twice"
        stats = await chaos.queue_stats()
        assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0), stats
        assert worker.metric("fnq_calls_total", 'status="success"') == len(b.ids)
        # Each part that met the restart (the record writer, the heartbeat: which ones,
        # if any, depends on when it fell; a pooled connection that broke while idle is
        # replaced unseen) says so once, and once that it is back.
        logs = chaos.cluster.logs()
        for down, back in (
            ("the database is unavailable", "the database is back"),
            ("datastore unavailable for cancellations/heartbeats", "datastore is back"),
        ):
            assert logs.count(down) <= 1 and logs.count(back) == logs.count(down), logs[-3000:]
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0
        assert chaos.containers() == []
    finally:
        chaos.cluster.tear_down()


async def test_a_worker_killed_while_postgres_is_down_has_acked_only_recorded_calls(
    tmp_path: Path, redis_server: RedisServer, pg: PostgresServer, images: None
) -> None:
    chaos = make_chaos(tmp_path, "redis", redis_server, pg.url)
    prefix = chaos.cluster.env["FN_MQ_URL"].rsplit("prefix=", 1)[1]
    try:
        await chaos.register()
        b = burst(echo=200, sleep=20)
        await chaos.enqueue(b.calls)
        victim = chaos.start(metrics=True)
        await under_way(chaos, b.ids, {c.id for c in b.sleep})
        before = await chaos.records(b.ids)
        pg.stop()
        # The calls in containers end meanwhile; their records wait for the database.
        await victim.wait_metric("fnq_calls_recording", at_least=2)
        victim.kill()
        redis = Redis(port=redis_server.port)
        try:
            queued = {k.decode() for k in redis.hkeys(f"{prefix}:ids")}
        finally:
            redis.close()
        acked = set(b.ids) - queued
        pg.resume()
        after = await chaos.records(b.ids)
        # Whatever left the queue has its final record: the record came first.
        assert [i for i in acked if not after[i].is_final] == []
        assert len(acked) >= finals(before)
        heir = chaos.start(metrics=True)
        done = await chaos.wait_final(b.ids, timeout_s=60)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        for i, rec in after.items():
            if rec.is_final:
                assert done[i] == rec
        # The calls the dead worker ran but could not record ran again: their records
        # count the attempts that had been marked `running` before the database went.
        rerun = [i for i in b.ids if not after[i].is_final]
        marked = running_on(after, victim)
        assert {i: done[i].attempts for i in rerun} == {i: 2 if i in marked else 1 for i in rerun}
        assert heir.metric("fnq_calls_total", 'status="success"') == len(rerun)
        print(f"{len(acked)} acked, {finals(after)} recorded at the kill, {len(rerun)} run again")
    finally:
        chaos.cluster.tear_down()
