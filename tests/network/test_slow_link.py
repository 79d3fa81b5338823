"""One worker over a slow link: each chunk between it and Redis, and between it
and PostgreSQL, delayed by 20 ms each way (tests.network.proxy), against the
same worker with no delay.

Its round trips are shared by many calls (a reserve takes several, acks ride
on reserves, record writes are committed in batches), so a call costs well under
one round trip on either link and throughput does not collapse to one call per
round trip: it is bounded by the prefetch places, each held for about two round
trips (the reserve, then the read of the records), so about ``prefetch / (2 x
RTT)`` (docs/worker.md, *Prefetch*). The figures are printed; the host is
shared, so only the batching is held to a bound, and the throughput to a floor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config.domain import new_call_id
from datastore.base import open_datastore
from tests.chaos.conftest import ECHO, chaos_env
from tests.network.conftest import new_database
from tests.network.proxy import SlowLink
from tests.rig import PostgresServer, RedisServer
from tests.worker.conftest import Cluster, base_env, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLS = 1000
PREFETCH = 8
DELAY_S = 0.020  # each way
MAX_CHUNKS_PER_CALL = 2.5  # on each link, both ways: one round trip costs two
MIN_CALLS_PER_S = 25.0  # at 40 ms a round trip; one call per two round trips is 12.5
DEADLINE_S = 120.0  # for one burst to end


@pytest.fixture
async def links(
    redis_server: RedisServer, postgres_server: PostgresServer
) -> AsyncIterator[tuple[SlowLink, SlowLink]]:
    redis = await SlowLink("127.0.0.1", redis_server.port).start()
    pg = await SlowLink("127.0.0.1", postgres_server.port).start()
    yield redis, pg
    await redis.close()
    await pg.close()


async def _timed(cluster: Cluster, links: tuple[SlowLink, SlowLink]) -> tuple[float, float, float]:
    """Push CALLS echo calls at once; calls/s from the push to the last final record,
    and the chunks per call through each link meanwhile."""
    calls = make_calls("chaos", "echo", CALLS)
    ids = [c.id for c in calls]
    store = await open_datastore(cluster.settings)
    try:
        redis_chunks, pg_chunks = links[0].chunks, links[1].chunks
        started = time.monotonic()
        await cluster.enqueue(calls)  # its own round trips do not go through the links
        deadline = started + DEADLINE_S
        while sum(r.is_final for r in (await store.get_calls(ids)).values()) < CALLS:
            assert time.monotonic() < deadline, f"not all final:\n{cluster.logs()[-3000:]}"
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
    finally:
        await store.close()
    return (
        CALLS / took,
        (links[0].chunks - redis_chunks) / CALLS,
        (links[1].chunks - pg_chunks) / CALLS,
    )


async def test_a_slow_link_costs_throughput_not_round_trips_per_call(
    tmp_path: Path,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    links: tuple[SlowLink, SlowLink],
    images: None,
) -> None:
    database = await new_database(postgres_server)
    prefix = f"s{new_call_id()[-8:].lower()}"
    local_db = f"{postgres_server.url.rsplit('/', 1)[0]}/{database}"
    cluster = Cluster(
        chaos_env(base_env(tmp_path, f"{redis_server.url}?prefix={prefix}", local_db)), tmp_path
    )
    far = {
        "FN_MQ_URL": f"redis://127.0.0.1:{links[0].port}/0?prefix={prefix}",
        "FN_DB_URL": f"postgresql://{postgres_server.user}@127.0.0.1:{links[1].port}/{database}",
    }
    try:
        await cluster.register(ECHO)
        cluster.start_worker("--prefetch", str(PREFETCH), env=far)
        warm = make_calls("chaos", "echo", 50)
        await cluster.enqueue(warm)
        await cluster.wait_final([c.id for c in warm], timeout_s=60)
        near = await _timed(cluster, links)
        for link in links:
            link.delay_s = DELAY_S
        slow = await _timed(cluster, links)
        print(
            f"no delay: {near[0]:.0f} calls/s; {DELAY_S * 1000:g} ms each way: {slow[0]:.0f}"
            f" calls/s ({slow[0] / near[0]:.2f}x); chunks per call, redis / postgres:"
            f" {near[1]:.2f} / {near[2]:.2f} and {slow[1]:.2f} / {slow[2]:.2f}"
        )
        assert max(near[1:] + slow[1:]) <= MAX_CHUNKS_PER_CALL, (near, slow)
        assert slow[0] >= MIN_CALLS_PER_S, (near, slow)
    finally:
        cluster.tear_down()
