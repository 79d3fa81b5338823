"""The network between a worker and its Redis server goes silent in the middle of a
burst (every packet dropped, no reset: half-open connections), then comes back.

The worker notices within its queue's time limit (``timeout_s``, 10 s) and says
so in one line with the reason; the calls it holds run on and are recorded;
their reservations lapse meanwhile and their acks are lost, so their messages
come back once the link does, and their final records settle them: no call
is lost, none runs twice. The intake resumes by itself. A worker waiting in a
blocking read on an empty queue, where nothing would time out before its whole
wait (a minute by default), notices as soon.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from config.domain import CallStatus
from tests.chaos.conftest import burst, burst_under_way
from tests.network.conftest import (
    FarHost,
    empty_reasons,
    far_chaos,
    logged_at,
    wait_blocked,
    wait_logged,
    wait_queue_empty,
)
from tests.rig import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 10.0  # the queue's time limit of one round trip (docs/queue.md, timeout_s)
DOWN = "unavailable, pausing its intake"
BACK = "is back, resuming its intake"


@pytest.mark.parametrize("backend", ["redis", "rq"])
@pytest.mark.parametrize("cut_s", [5, 25])
async def test_a_worker_rides_out_a_silent_redis_mid_burst(
    tmp_path: Path,
    far_host: FarHost,
    far_redis: RedisServer,
    images: None,
    backend: str,
    cut_s: float,
) -> None:
    chaos = far_chaos(tmp_path, far_host, backend, far_redis)
    try:
        b, worker = await burst_under_way(chaos, echo=300, sleep=20)
        far_host.cut(far_redis.port)
        cut_at = time.time()
        # The intake's reserve times out, or its connection is given up, in 10 s. The
        # RQ bridge's reserve may have claimed a job just before the cut: its STARTED
        # mark (rq's own transaction, several round trips) is bounded at twice that.
        notice_s = TIMEOUT_S if backend == "redis" else 2 * TIMEOUT_S
        if cut_s > notice_s:
            took = await wait_logged(chaos, DOWN, cut_at, timeout_s=notice_s + 5)
            print(f"{backend}: the intake noticed {took:.1f} s after the cut")
        await asyncio.sleep(max(0.0, cut_at + cut_s - time.time()))  # the outage itself
        far_host.heal()
        healed_at = time.time()
        if logged_at(chaos.cluster.logs(), DOWN):
            # Back at the first reserve after its backoff (10 s at most) that the
            # server answers.
            took = await wait_logged(chaos, BACK, healed_at, timeout_s=20)
            print(f"{backend}: the intake resumed {took:.1f} s after the link came back")
        done = await chaos.wait_final(b.ids, timeout_s=40)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        assert {r.attempts for r in done.values()} == {1}, "a call ran twice"
        await wait_queue_empty(chaos)
        logs = chaos.cluster.logs()
        assert len(logged_at(logs, DOWN)) <= 1, logs[-4000:]
        assert len(logged_at(logs, BACK)) == len(logged_at(logs, DOWN)), logs[-4000:]
        assert empty_reasons(logs) == []
        assert worker.proc.poll() is None, "the worker exited"
    finally:
        chaos.cluster.tear_down()


async def test_an_idle_worker_notices_a_silent_redis_within_the_time_limit(
    tmp_path: Path, far_host: FarHost, far_redis: RedisServer, images: None
) -> None:
    """Its reserve blocks for FN_ASYNC_CHEW_POLL_MSECS (a minute) on a connection that
    hears nothing: the connection is given up after 10 s of silence, not after the
    block time plus the time limit (70 s)."""
    chaos = far_chaos(tmp_path, far_host, "redis", far_redis)
    chaos.cluster.env["FN_ASYNC_CHEW_POLL_MSECS"] = "60000"
    try:
        await chaos.register()
        first = burst(echo=3, sleep=0)
        await chaos.enqueue(first.calls)
        worker = chaos.start()
        await chaos.wait_final(first.ids)
        # Nothing is due now: the next reserve is a blocking read of a whole minute.
        await wait_blocked(far_redis, far_host, for_s=2.0)
        far_host.cut(far_redis.port)
        cut_at = time.time()
        took = await wait_logged(chaos, DOWN, cut_at, timeout_s=TIMEOUT_S * 2)
        print(f"the idle worker noticed {took:.1f} s after the cut")
        far_host.heal()
        later = burst(echo=3, sleep=0)
        await chaos.enqueue(later.calls)
        await chaos.wait_final(later.ids, timeout_s=30)
        assert empty_reasons(chaos.cluster.logs()) == []
        assert worker.proc.poll() is None
    finally:
        chaos.cluster.tear_down()
