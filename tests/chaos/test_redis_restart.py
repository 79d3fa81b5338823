"""redis-server killed (SIGKILL) and started again on its port in the middle of a
burst, with and without an append-only file.

The worker rides the outage out: its intake pauses and comes back, the calls it
holds finish and are recorded, and their acks and reservations reach the server
once it is back. With `appendonly yes` nothing is lost and nothing runs twice.
Without it the server comes back empty: the calls whose messages were still
queued there are lost to the queue (Redis's own data loss, docs/queue.md,
*Durability*) and keep their `queued` record, never run; `fnq calls cancel` then
`fnq calls retry` queues each again. The worker goes on with new calls.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.domain import CallStatus
from datastore.base import CallRecord
from tests.chaos.conftest import Chaos, burst, finals, make_chaos, running_on
from tests.rig import RedisServer


@pytest.fixture(params=[True, False], ids=["appendonly", "no-persistence"])
def own_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=bool(request.param))
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


async def test_the_worker_rides_out_a_redis_restart_mid_burst(
    tmp_path: Path, own_redis: RedisServer, images: None
) -> None:
    chaos: Chaos = make_chaos(tmp_path, "redis", own_redis)
    try:
        await _restart_mid_burst(chaos, own_redis)
    finally:
        chaos.cluster.tear_down()


async def _restart_mid_burst(chaos: Chaos, server: RedisServer) -> None:
    await chaos.register()
    b = burst(echo=200, sleep=20)
    sleep_ids = {c.id for c in b.sleep}
    await chaos.enqueue(b.calls)
    worker = chaos.start(metrics=True)
    await chaos.wait(
        b.ids,
        lambda r: finals(r) >= 40 and len(running_on(r, worker) & sleep_ids) >= 2,
        "under way (40 final, two sleep calls running)",
    )
    server.stop(signal.SIGKILL)
    await chaos.wait_log("unavailable, pausing its intake")
    # Down for longer than a reservation: once the server is back, the reservations
    # it holds have run out by its clock (an interval of time, no event to wait for).
    await asyncio.sleep(chaos.settings.mq_reservation_msecs / 1000 + 0.5)
    server.start()
    await chaos.wait_log("is back, resuming its intake")

    after_burst = burst(echo=40, sleep=4)
    await chaos.enqueue(after_burst.calls)
    await chaos.wait_final(after_burst.ids, timeout_s=60)
    if server.appendonly:
        done = await chaos.wait_final(b.ids, timeout_s=60)
        lost: list[str] = []
    else:
        # What the worker held ends; what was still queued in the server is gone.
        done = await chaos.wait(b.ids, _settled, "ended or left queued", timeout_s=60)
        lost = [i for i, r in done.items() if not r.is_final]
        assert all(done[i].status is CallStatus.QUEUED and done[i].attempts == 0 for i in lost)
        assert lost, "the restart lost no queued call: the burst ended before it"
        # docs/queue.md's way to queue them again
        cancelled = chaos.cluster.fnq("calls", "cancel", *lost)
        assert cancelled.returncode == 0, cancelled
        retried = chaos.cluster.fnq("calls", "retry", *lost)
        assert retried.returncode == 0 and retried.stdout.split() == lost, retried
        done = await chaos.wait_final(b.ids, timeout_s=60)
    assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
    assert {r.attempts for r in done.values()} == {1}, "a call ran twice"
    stats = await chaos.queue_stats()
    assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0), stats
    ran = len(b.ids) + len(after_burst.ids)
    assert worker.metric("fnq_calls_total", 'status="success"') == ran
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0
    assert chaos.containers() == []
    print(f"appendonly={server.appendonly}: {len(lost)} queued call(s) lost and retried")


def _settled(recs: dict[str, CallRecord]) -> bool:
    """Every call final or `queued` (the calls the worker held were taken before the
    restart and end before those queued after it, which have ended)."""
    return all(r.is_final or r.status is CallStatus.QUEUED for r in recs.values())
