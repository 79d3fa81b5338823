"""A worker stopped (SIGTERM) while the network to its Redis server is silent.

It does not hang on a socket: the reserve under way ends within the queue's
time limit, the calls in containers get the grace period (counted from the
signal), and those stopped then are put back to `queued` in the datastore,
their messages left to come back when their reservations lapse, since nothing
can be handed back over a silent link. The log says so once, and the last line
counts them as such. Once the link is back another worker runs what was left,
and no call is lost.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest

from config.domain import CallStatus
from tests.chaos.conftest import burst_under_way
from tests.network.conftest import (
    FarHost,
    empty_reasons,
    far_chaos,
    wait_queue_empty,
)
from tests.rig import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMEOUT_S = 10.0  # the queue's time limit of one round trip
GRACE_S = 1.0
# Past the longer of the grace and the time limit: handing back (2 s for the record, 5 s
# for the message), leaving the consumer group (2 s), and some slack for a busy host.
EXIT_AFTER_S = 9.0 + 6.0
LAST_LINE = re.compile(
    r"stopped after \d+ call\(s\) ended here, (\d+) handed back to the queue"
    r"(?:, (\d+) left to come back as their reservations lapse)?"
)


async def test_a_worker_stopped_while_redis_is_silent_ends_in_time_and_loses_nothing(
    tmp_path: Path, far_host: FarHost, far_redis: RedisServer, images: None
) -> None:
    chaos = far_chaos(tmp_path, far_host, "redis", far_redis)
    chaos.cluster.env["FN_SHUTDOWN_GRACE_MSECS"] = str(int(GRACE_S * 1000))
    try:
        # sleep calls outlast the grace
        b, worker = await burst_under_way(chaos, echo=200, sleep=20, body=b"4")
        far_host.cut(far_redis.port)
        stopped_at = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, 60)
        took = time.monotonic() - stopped_at
        print(f"the worker exited {took:.1f} s after SIGTERM (grace {GRACE_S:g} s)")
        logs = chaos.cluster.logs()
        assert code == 0, logs[-4000:]
        assert took < max(GRACE_S, TIMEOUT_S) + EXIT_AFTER_S, logs[-4000:]
        [last] = LAST_LINE.findall(logs)
        handed_back, left = int(last[0]), int(last[1] or 0)
        assert (handed_back, left > 0) == (0, True), logs[-4000:]  # nothing reached the queue
        assert logs.count("handing it back failed") == 1, logs[-4000:]  # one warning for all
        assert empty_reasons(logs) == []

        far_host.heal()
        chaos.start()
        done = await chaos.wait_final(b.ids, timeout_s=40)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        # A call stopped in its container ran again, its stopped run counted.
        rerun = {i for i, r in done.items() if r.attempts != 1}
        assert rerun <= {c.id for c in b.sleep} and {done[i].attempts for i in rerun} <= {2}, rerun
        await wait_queue_empty(chaos)
    finally:
        chaos.cluster.tear_down()
