"""A worker killed with SIGKILL in the middle of a burst, on each queue backend.

At the kill some calls are in containers, some reserved and waiting, some
records being written. The next worker on the host ends every call: those the
dead worker recorded final stay as they were and do not run again; those it had
marked `running` run again, their record counting both attempts; the others
run once. It removes the dead worker's containers as it starts.
"""

from __future__ import annotations

import signal

from redis import Redis
from rq.job import Job

from config.domain import CallStatus
from tests.chaos.conftest import Chaos, burst_under_way, running_on


async def test_a_worker_killed_mid_burst_loses_no_call_and_reruns_only_its_running_ones(
    chaos: Chaos,
) -> None:
    b, victim = await burst_under_way(chaos, echo=240, sleep=24, final=60)
    victim.kill()
    at_kill = await chaos.records(b.ids)
    left_running = running_on(at_kill, victim)
    ended = {i: r for i, r in at_kill.items() if r.is_final}
    assert left_running and ended and len(ended) < len(b.ids)
    assert chaos.containers(victim), "the dead worker left no container to clean up"
    held = (await chaos.queue_stats()).reserved if chaos.backend != "rq" else -1

    heir = chaos.start(metrics=True)
    swept_s = await chaos.wait_no_containers(victim, timeout_s=15)
    done = await chaos.wait_final(b.ids, timeout_s=60)

    assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
    # A final record is never written again, and the call it ended does not run again.
    for i, rec in ended.items():
        assert done[i] == rec, (i, rec, done[i])
    rerun = {i for i in b.ids if i not in ended}
    assert all(done[i].worker_id == heir.id for i in rerun)
    # The calls the dead worker had marked `running` count both attempts; every other
    # call was counted once. (A call in its container for less than the `running`
    # mark's 50 ms when the worker died runs again uncounted: docs/worker.md.)
    attempts = {i: done[i].attempts for i in rerun}
    assert attempts == {i: 2 if i in left_running else 1 for i in rerun}
    if chaos.backend == "rq":
        redis = Redis.from_url(chaos.rq_url)
        try:
            jobs = Job.fetch_many(b.ids, connection=redis, serializer="json")
            assert {j.get_status(refresh=False) for j in jobs if j is not None} == {"finished"}
        finally:
            redis.close()
    else:
        stats = await chaos.queue_stats()
        assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0), stats
    # The heir ran exactly the calls that had not ended, each once to its end.
    assert heir.metric("fnq_calls_total", 'status="success"') == len(rerun)
    heir.proc.send_signal(signal.SIGTERM)
    assert heir.proc.wait(30) == 0, chaos.cluster.logs()[-3000:]
    assert chaos.containers() == []
    print(f"{chaos.backend}: {len(ended)} ended before the kill, {len(left_running)} running, "
          f"{held} held; its containers gone {swept_s:.1f} s after the heir started")  # fmt: skip
