"""The worker end to end: real redis-server, dockerd, SQLite/PostgreSQL, FDK images."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import asyncpg
import pytest
import redis

from config.domain import Call, CallStatus, Function, new_call_id
from datastore.base import open_datastore
from mq.base import open_queue
from tests.rig import PostgresServer, RedisServer, pg_tempdir
from tests.worker.conftest import Cluster, base_env, by_status, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ECHO = Function(
    app="t",
    name="echo",
    image="fnq/echo:latest",
    memory_mb=64,
    timeout_s=20,
    max_attempts=3,
    retry_backoff_s=0.2,
)


async def test_redis_cli_enqueue_runs_and_records(
    redis_cluster: Cluster, redis_server: RedisServer
) -> None:
    await redis_cluster.register(ECHO)
    prefix = redis_cluster.env["FN_MQ_URL"].split("prefix=")[1]
    call_id = new_call_id()
    # The README's command, with the test's own key prefix and port.
    subprocess.run(
        [
            "redis-cli",
            "-p",
            str(redis_server.port),
            "XADD",
            f"{prefix}:calls",
            "*",
            "app",
            "t",
            "fn",
            "echo",
            "body",
            "hello from redis-cli",
            "id",
            call_id,
        ],
        check=True,
        capture_output=True,
        timeout=10,
    )
    redis_cluster.start_worker()
    done = await redis_cluster.wait_final([call_id], timeout_s=90)
    rec = done[call_id]
    assert rec.status is CallStatus.SUCCESS, rec
    assert rec.response_status == 200
    assert rec.response_body == b"hello from redis-cli"
    assert rec.attempts == 1
    shown = json.loads(redis_cluster.fnq("calls", "show", call_id, "--json").stdout)
    assert shown["status"] == "success"
    assert shown["stats"]["cpu_ms"] > 0 and shown["stats"]["memory_mb"] > 0  # from its cgroup


async def test_two_workers_share_500_calls_each_once(redis_cluster: Cluster) -> None:
    await redis_cluster.register(ECHO)
    calls = make_calls("t", "echo", 500)
    await redis_cluster.enqueue(calls)
    redis_cluster.start_worker()
    redis_cluster.start_worker()
    done = await redis_cluster.wait_final([c.id for c in calls], timeout_s=240)
    assert by_status(done) == {CallStatus.SUCCESS: 500}
    assert all(r.attempts == 1 for r in done.values()), "a call ran more than once"
    workers = {r.worker_id for r in done.values()}
    assert len(workers) == 2, f"work was not shared: {workers}"


async def test_sigkill_mid_run_loses_nothing(redis_cluster: Cluster) -> None:
    slow = Function(
        app="t", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=20, max_attempts=3
    )
    await redis_cluster.register(slow)
    calls = make_calls("t", "sleep", 6, body=b"1")
    await redis_cluster.enqueue(calls)
    victim = redis_cluster.start_worker()
    # Wait until the victim is running calls, then kill it without warning.
    store_ids = [c.id for c in calls]

    store = await open_datastore(redis_cluster.settings)
    try:
        for _ in range(300):
            recs = [await store.get_call(i) for i in store_ids]
            if any(r is not None and r.status is CallStatus.RUNNING for r in recs):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no call started: " + redis_cluster.logs()[-3000:])
    finally:
        await store.close()
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    redis_cluster.start_worker()
    done = await redis_cluster.wait_final(store_ids, timeout_s=120)
    assert by_status(done) == {CallStatus.SUCCESS: 6}


async def test_restart_redis_mid_run(tmp_path: Path, images: None) -> None:

    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.directory.mkdir()
    server.start()
    cluster = Cluster(base_env(tmp_path, server.url), tmp_path)
    try:
        await cluster.register(ECHO)
        first = make_calls("t", "echo", 50)
        await cluster.enqueue(first)
        cluster.start_worker()
        await cluster.wait_final([c.id for c in first], timeout_s=90)
        server.restart()
        second = make_calls("t", "echo", 50)
        await cluster.enqueue(second)
        done = await cluster.wait_final([c.id for c in second], timeout_s=120)
        assert by_status(done) == {CallStatus.SUCCESS: 50}
        cluster.stop_all()
    finally:
        cluster.tear_down()  # a failed assertion leaves no worker behind
        server.stop()


async def test_graceful_shutdown_finishes_running_calls(sqlite_cluster: Cluster) -> None:
    slow = Function(app="t", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=20)
    await sqlite_cluster.register(slow)
    calls = make_calls("t", "sleep", 2, body=b"2")
    await sqlite_cluster.enqueue(calls)
    worker = sqlite_cluster.start_worker()

    store = await open_datastore(sqlite_cluster.settings)
    try:
        for _ in range(300):
            rec = await store.get_call(calls[0].id)
            if rec is not None and rec.status is CallStatus.RUNNING:
                break
            await asyncio.sleep(0.1)
    finally:
        await store.close()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0, sqlite_cluster.logs()[-3000:]
    # What was running finished; what had not started is still queued for the next worker.
    sqlite_cluster.start_worker()
    done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=90)
    assert by_status(done) == {CallStatus.SUCCESS: 2}
    assert all(r.attempts == 1 for r in done.values())


CASES = [
    # name, image, body, memory, timeout, status, error fragment
    ("raise", "fnq/raise:latest", b"boom", 64, 20, CallStatus.ERROR, "function failed: "),
    ("exit", "fnq/exit:latest", b"3", 64, 20, CallStatus.ERROR, "code 3"),
    ("sleep", "fnq/sleep:latest", b"30", 64, 2, CallStatus.TIMEOUT, "longer than 2 s"),
    ("oom", "fnq/oom:latest", b"", 32, 20, CallStatus.ERROR, "out of memory"),
    ("nosocket", "fnq/nosocket:latest", b"", 64, 20, CallStatus.ERROR, "did not create lsnr.sock"),
    ("badlink", "fnq/badlink:latest", b"", 64, 20, CallStatus.ERROR, "symlink"),
    ("missing", "fnq/does-not-exist:1", b"", 64, 20, CallStatus.ERROR, "not found"),
    ("bytes", "fnq/bytes:latest", b"50000", 64, 20, CallStatus.ERROR, "response too large"),
]


async def test_misbehaving_functions_end_clearly_while_others_flow(
    sqlite_cluster: Cluster,
) -> None:
    sqlite_cluster.env["FN_HOT_START_TIMEOUT_MSECS"] = "2000"
    sqlite_cluster.env["FN_MAX_RESPONSE_SIZE"] = "10000"
    sqlite_cluster.env["FN_MAX_LOG_SIZE_BYTES"] = "2000"
    await sqlite_cluster.register(
        Function(app="t", name="logs", image="fnq/logs:latest", memory_mb=64, timeout_s=20)
    )
    chatty = Call(id=new_call_id(), app="t", fn="logs", body=b"500")
    await sqlite_cluster.register(ECHO)
    bad_ids: dict[str, str] = {}
    calls: list[Call] = []
    for name, image, body, memory, timeout, _, _ in CASES:
        await sqlite_cluster.register(
            Function(
                app="bad",
                name=name,
                image=image,
                memory_mb=memory,
                timeout_s=timeout,
                max_attempts=1,
            )
        )
        call = Call(id=new_call_id(), app="bad", fn=name, body=body)
        bad_ids[name] = call.id
        calls.append(call)
    unknown = Call(id=new_call_id(), app="bad", fn="unregistered", body=b"")
    good = make_calls("t", "echo", 20)
    await sqlite_cluster.enqueue([*calls, unknown, chatty, *good])
    sqlite_cluster.start_worker()
    everything = [*calls, unknown, chatty, *good]
    done = await sqlite_cluster.wait_final([c.id for c in everything], timeout_s=180)
    # Too much output is cut with one marker; the call itself succeeded.
    assert done[chatty.id].status is CallStatus.SUCCESS and done[chatty.id].log_truncated
    log = await sqlite_cluster.log_of(chatty.id) or b""
    assert log.count(b"log exceeded 2000 bytes") == 1 and 2000 <= len(log) < 2200, log[-200:]
    assert by_status({c.id: done[c.id] for c in good}) == {CallStatus.SUCCESS: 20}
    for name, _, _, _, _, status, fragment in CASES:
        rec = done[bad_ids[name]]
        assert rec.status is status, (name, rec)
        assert rec.error and fragment in rec.error.lower(), (name, rec.error)
    assert "not registered" in (done[unknown.id].error or "")
    dead = sqlite_cluster.fnq("dead", "list", "--json")
    dead_ids = {d["id"] for d in json.loads(dead.stdout)}
    assert unknown.id in dead_ids and bad_ids["missing"] in dead_ids


async def test_a_worker_and_the_cli_over_redis_unix_socket(
    tmp_path: Path, redis_server: RedisServer, images: None
) -> None:
    prefix = f"u{new_call_id()[-8:].lower()}"
    cluster = Cluster(base_env(tmp_path, f"{redis_server.unix_url}&prefix={prefix}"), tmp_path)
    try:
        await cluster.register(ECHO)
        calls = make_calls("t", "echo", 20)
        await cluster.enqueue(calls)
        cluster.start_worker()
        waited = cluster.fnq("call", "t", "echo", "--body", "hi", "--wait", "--wait-timeout", "60")
        assert waited.returncode == 0 and waited.stdout == "hi", waited
        done = await cluster.wait_final([c.id for c in calls], timeout_s=90)
        assert by_status(done) == {CallStatus.SUCCESS: 20}
    finally:
        cluster.stop_all()
    # the calls went through that server, under that prefix
    tcp = redis.Redis(port=redis_server.port)
    try:
        assert tcp.exists(f"{prefix}:calls", f"{prefix}:ready:0") == 2
    finally:
        tcp.close()


async def test_redis_queue_with_postgres_store(
    tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer, images: None
) -> None:

    db = f"w{new_call_id()[-10:].lower()}"
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()
    url = postgres_server.url.rsplit("/", 1)[0] + f"/{db}"
    prefix = f"p{new_call_id()[-8:].lower()}"
    cluster = Cluster(base_env(tmp_path, f"{redis_server.url}?prefix={prefix}", url), tmp_path)
    try:
        await cluster.register(ECHO)
        calls = make_calls("t", "echo", 100)
        await cluster.enqueue(calls)
        cluster.start_worker()
        cluster.start_worker()
        done = await cluster.wait_final([c.id for c in calls], timeout_s=120)
        assert by_status(done) == {CallStatus.SUCCESS: 100}
        assert all(r.attempts == 1 for r in done.values())
    finally:
        cluster.stop_all()


async def test_datastore_outage_pauses_and_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, images: None
) -> None:
    pg = PostgresServer(pg_tempdir(tmp_path)).start()
    prefix = f"o{new_call_id()[-8:].lower()}"
    cluster = Cluster(base_env(tmp_path, f"{redis_server.url}?prefix={prefix}", pg.url), tmp_path)
    try:
        await cluster.register(ECHO)
        first = make_calls("t", "echo", 20)
        await cluster.enqueue(first)
        cluster.start_worker()
        await cluster.wait_final([c.id for c in first], timeout_s=90)
        pg.stop()
        # Calls arrive while the datastore is down; the worker runs or holds them.
        queue = open_queue(cluster.settings.mq_url, cluster.settings)
        during = make_calls("t", "echo", 20)
        try:
            await queue.push_many(during)
        finally:
            await queue.close()
        await asyncio.sleep(3)
        pg.resume()
        done = await cluster.wait_final([c.id for c in during], timeout_s=120)
        assert by_status(done) == {CallStatus.SUCCESS: 20}
        assert all(r.attempts == 1 for r in done.values())
        logs = cluster.logs()
        assert "the database is unavailable" in logs and "the database is back" in logs
        assert logs.count("the database is unavailable") == 1, "logged once, not per try"
        assert "Failed to restore the pool connection floor" not in logs
        cluster.stop_all()
    finally:
        cluster.tear_down()  # a failed assertion leaves no worker behind
        pg.stop()
