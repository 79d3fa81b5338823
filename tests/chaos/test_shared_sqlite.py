"""Two worker processes on one SQLite queue and one SQLite datastore; one is killed
with SIGKILL in the middle of a burst.

The other goes on: it takes the dead worker's calls once their reservations
lapse, runs again only those the dead one had marked `running` (the dead
worker's process is gone, so they are not left to it), leaves the calls the
dead one recorded final as they are, and removes the dead one's containers
within its 5 s sweep.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from config.domain import CallStatus
from tests.chaos.conftest import burst, finals, make_chaos, running_on


async def test_the_survivor_of_two_sqlite_workers_ends_the_dead_one_s_calls(
    tmp_path: Path, images: None
) -> None:
    chaos = make_chaos(tmp_path, "sqlite", None)
    try:
        await chaos.register()
        b = burst(echo=300, sleep=30)
        sleep_ids = {c.id for c in b.sleep}
        await chaos.enqueue(b.calls)
        victim = chaos.start()
        survivor = chaos.start(metrics=True)
        await chaos.wait(
            b.ids,
            lambda r: (
                finals(r) >= 80
                and len(running_on(r, victim) & sleep_ids) >= 2
                and bool(running_on(r, survivor))
            ),
            "under way on both (80 final, two sleep calls running on the victim)",
        )
        victim.kill()
        killed_at = time.monotonic()
        at_kill = await chaos.records(b.ids)
        left_running = running_on(at_kill, victim)
        ended = {i: r for i, r in at_kill.items() if r.is_final}
        assert chaos.containers(victim)
        await chaos.wait_no_containers(victim, timeout_s=15)
        swept_s = time.monotonic() - killed_at

        done = await chaos.wait_final(b.ids, timeout_s=60)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        for i, rec in ended.items():
            assert done[i] == rec
        rest = [i for i in b.ids if i not in ended]
        assert {i: done[i].attempts for i in rest} == {
            i: 2 if i in left_running else 1 for i in rest
        }
        assert {done[i].worker_id for i in left_running} == {survivor.id}
        survived = {i for i, r in done.items() if r.worker_id == survivor.id}
        assert survivor.metric("fnq_calls_total", 'status="success"') == len(survived)
        stats = await chaos.queue_stats()
        assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0), stats
        survivor.proc.send_signal(signal.SIGTERM)
        assert survivor.proc.wait(30) == 0
        assert chaos.containers() == []
        print(f"{len(ended)} ended, {len(left_running)} running on the dead worker; "
              f"its containers gone {swept_s:.1f} s after the kill")  # fmt: skip
    finally:
        chaos.cluster.tear_down()
