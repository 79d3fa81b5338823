"""The network between a worker and its PostgreSQL datastore goes silent (every
packet dropped, no reset: half-open connections), then comes back, or never does.

Mid-burst, the worker notices within 10 s (a connection that hears nothing from
the server's host for that long is given up, whatever the statement's own time
limit), says so once, keeps the calls it ran while their records wait, and
writes them once the link is back: nothing lost, nothing run twice.

A worker whose link goes silent for good in the middle of a transaction (its
host lost, or cut off) leaves the server a session that still holds the rows it
wrote locked; no packet will ever tell the server it is gone. The server ends
it within 10 s (fnq's sessions carry idle_in_transaction_session_timeout), so
the next worker to write those calls' records is not held up behind it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.domain import CallStatus, Outcome, utcnow
from config.settings import load_settings
from datastore.base import open_datastore
from datastore.postgres import DEAD_AFTER_S, IDLE_IN_TRANSACTION_S
from tests.chaos.conftest import burst_under_way
from tests.network.conftest import (
    FarHost,
    empty_reasons,
    far_chaos,
    logged_at,
    new_database,
    wait_logged,
    wait_queue_empty,
)
from tests.rig import PostgresServer, RedisServer
from tests.worker.conftest import base_env, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOWN = "the database is unavailable"
BACK = "the database is back"
HOLDER = Path(__file__).with_name("hold_lock.py")


async def test_records_wait_out_a_silent_postgres_mid_burst(
    tmp_path: Path,
    far_host: FarHost,
    far_redis: RedisServer,
    far_postgres: PostgresServer,
    images: None,
) -> None:
    database = await new_database(far_postgres)
    chaos = far_chaos(tmp_path, far_host, "redis", far_redis, far_postgres, database)
    try:
        b, worker = await burst_under_way(chaos, echo=300, sleep=20)
        far_host.cut(far_postgres.port)
        cut_at = time.time()
        took = await wait_logged(chaos, DOWN, cut_at, timeout_s=DEAD_AFTER_S + 8)
        print(f"the record writer noticed {took:.1f} s after the cut")
        await asyncio.sleep(max(0.0, cut_at + 25 - time.time()))  # the outage itself
        far_host.heal()
        took = await wait_logged(chaos, BACK, time.time(), timeout_s=20)
        print(f"records were written again {took:.1f} s after the link came back")
        done = await chaos.wait_final(b.ids, timeout_s=40)
        assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
        assert {r.attempts for r in done.values()} == {1}, "a call ran twice"
        await wait_queue_empty(chaos)
        logs = chaos.cluster.logs()
        assert len(logged_at(logs, DOWN)) == len(logged_at(logs, BACK)) == 1, logs[-4000:]
        assert empty_reasons(logs) == []
        assert worker.proc.poll() is None, "the worker exited"
    finally:
        chaos.cluster.tear_down()


async def test_a_transaction_whose_client_is_lost_holds_no_record_for_long(
    tmp_path: Path, far_host: FarHost, far_postgres: PostgresServer
) -> None:
    database = await new_database(far_postgres)
    local_url = f"{far_postgres.url.rsplit('/', 1)[0]}/{database}"
    far_url = f"postgresql://{far_postgres.user}@{far_host.addr}:{far_postgres.port}/{database}"
    data_dir = tmp_path / "data"
    store = await open_datastore(load_settings(db_url=local_url, data_dir=data_dir))
    [call] = make_calls("chaos", "echo", 1)
    holder = None
    try:
        await store.record_queued(call)
        env = {**base_env(tmp_path, "", far_url), "FN_DB_URL": far_url}
        holder = await asyncio.create_subprocess_exec(
            *far_host.link.exec_prefix, sys.executable, str(HOLDER), call.id,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert holder.stdout is not None
        async with asyncio.timeout(30):
            said = await holder.stdout.readline()
        assert said.strip() == b"locked", said
        # Its host goes: no packet of it reaches the server any more, not even the
        # closing of its connection when the process dies.
        far_host.cut(far_postgres.port)
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        started = time.monotonic()
        outcome = Outcome(CallStatus.SUCCESS, started_at=utcnow(), completed_at=utcnow())
        async with asyncio.timeout(IDLE_IN_TRANSACTION_S + 20):
            assert await store.record_outcome(call, outcome, 1, "heir") is True
        took = time.monotonic() - started
        print(f"the record was written {took:.1f} s after the holder was lost")
        record = await store.get_call(call.id)
        assert record is not None and record.status is CallStatus.SUCCESS
    finally:
        if holder is not None and holder.returncode is None:
            holder.kill()
            await holder.wait()
        await store.close()
