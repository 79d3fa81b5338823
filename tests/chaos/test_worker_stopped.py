"""A worker stopped with SIGTERM in the middle of a burst, on each queue backend.

It takes no more calls, hands back at once those not yet in a container, lets
the calls in containers finish within its grace period (or, once that is over,
stops them and hands them back, their records `queued` again with that run
counted in `attempts`), removes its containers and exits 0. Nothing it held waits for a
reservation to lapse, and the next worker runs every call that had not ended,
each once.
"""

from __future__ import annotations

import signal
import time

import pytest
from redis import Redis
from rq.job import Job

from config.domain import CallStatus
from tests.chaos.conftest import Chaos, burst_under_way


@pytest.mark.parametrize(
    ("grace_ms", "sleep_body"),
    [(20000, b"1"), (1000, b"4")],
    ids=["calls-finish-in-grace", "grace-ends-first"],
)
async def test_a_worker_stopped_mid_burst_finishes_or_hands_back_each_call_once(
    chaos: Chaos, grace_ms: int, sleep_body: bytes
) -> None:
    chaos.cluster.env["FN_SHUTDOWN_GRACE_MSECS"] = str(grace_ms)
    b, worker = await burst_under_way(chaos, echo=200, sleep=20, body=sleep_body)
    stopped_at = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(grace_ms / 1000 + 15) == 0, chaos.cluster.logs()[-3000:]
    took_s = time.monotonic() - stopped_at
    assert chaos.containers(worker) == []

    after = await chaos.records(b.ids)
    assert not [r for r in after.values() if r.status is CallStatus.RUNNING], "left running"
    ended = {i: r for i, r in after.items() if r.is_final}
    assert {r.status for r in ended.values()} == {CallStatus.SUCCESS}
    back = [r for r in after.values() if not r.is_final]
    cut_short = "worker stopped before the call finished"
    stopped = {r.id for r in back if r.error and cut_short in r.error}
    # A run the stop cut short counts; a call that never reached its function does not.
    assert [r for r in back if r.attempts != (r.id in stopped)] == []
    if grace_ms > 4000:  # the calls in containers finished: those sleep calls ended
        assert len(ended) > 40 and not stopped
    else:  # stopped and handed back
        assert stopped
    # Everything it held went back at once: nothing waits for a reservation to lapse.
    if chaos.backend == "rq":
        assert _rq_held(chaos, b.ids) == 0
    else:
        assert (await chaos.queue_stats()).reserved == 0

    heir = chaos.start(metrics=True)
    done = await chaos.wait_final(b.ids, timeout_s=60)
    assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
    for i, rec in ended.items():
        assert done[i] == rec
    runs = {i: 1 + (i in stopped) for i in done}
    assert {i: r.attempts for i, r in done.items()} == runs, "a call ran twice"
    assert heir.metric("fnq_calls_total", 'status="success"') == len(b.ids) - len(ended)
    heir.proc.send_signal(signal.SIGTERM)
    assert heir.proc.wait(30) == 0
    assert chaos.containers() == []
    print(f"{chaos.backend}: exit 0 after {took_s:.1f} s, {len(ended)} ended, "
          f"{len(back)} handed back or never taken")  # fmt: skip


def _rq_held(chaos: Chaos, ids: list[str]) -> int:
    """The jobs fnq holds: its reservations, and jobs rq shows `started`."""
    redis = Redis.from_url(chaos.rq_url)
    try:
        jobs = Job.fetch_many(ids, connection=redis, serializer="json")
        started = sum(j is not None and j.get_status() == "started" for j in jobs)
        return int(redis.zcard("fnq:rq:reserved")) + started
    finally:
        redis.close()
