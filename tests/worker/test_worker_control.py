"""Cancelling calls, expiry, and the worker registry, end to end on real engines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import urllib.request
from datetime import timedelta
from pathlib import Path

import docker
import pytest

from config.domain import Call, CallStatus, Function, new_call_id, utcnow
from datastore.base import open_datastore
from tests.rig import free_port
from tests.worker.conftest import Cluster, base_env, make_calls
from worker.agent.drivers.docker_config import APP_LABEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLEEP = Function(
    app="t", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=30, max_attempts=3
)


async def wait_status(cluster: Cluster, call_id: str, status: CallStatus, timeout_s: float = 60):  # type: ignore[no-untyped-def]
    store = await open_datastore(cluster.settings)
    try:
        for _ in range(int(timeout_s * 10)):
            rec = await store.get_call(call_id)
            if rec is not None and rec.status is status:
                return rec
            await asyncio.sleep(0.1)
    finally:
        await store.close()
    raise AssertionError(f"{call_id} never reached {status}\n{cluster.logs()[-3000:]}")


async def test_cancel_queued_and_running_calls(sqlite_cluster: Cluster) -> None:
    await sqlite_cluster.register(SLEEP)
    running, queued = make_calls("t", "sleep", 2, body=b"20")
    await sqlite_cluster.enqueue([running])
    sqlite_cluster.start_worker()
    await wait_status(sqlite_cluster, running.id, CallStatus.RUNNING)
    # A call queued with a long delay, cancelled before any worker takes it.
    delayed = Call(id=queued.id, app="t", fn="sleep", body=b"20", delay_s=2.0)
    await sqlite_cluster.enqueue([delayed])
    out = sqlite_cluster.fnq("calls", "cancel", delayed.id)
    assert out.returncode == 0, out.stderr
    out = sqlite_cluster.fnq("calls", "cancel", running.id)
    assert out.returncode == 0, out.stderr
    stopped = await wait_status(sqlite_cluster, running.id, CallStatus.CANCELLED, timeout_s=15)
    assert stopped.completed_at is not None
    assert (stopped.completed_at - stopped.started_at).total_seconds() < 15  # not the full 20 s
    said = [ln for ln in sqlite_cluster.logs().splitlines() if "cancelled on request" in ln]
    assert said and all(f"fnq.worker [{running.id}]: call {running.id}" in ln for ln in said), said
    never = await wait_status(sqlite_cluster, delayed.id, CallStatus.CANCELLED)
    await asyncio.sleep(3)  # past its delay: the worker acks it without running it
    rec = json.loads(sqlite_cluster.fnq("calls", "show", delayed.id, "--json").stdout)
    assert rec["status"] == "cancelled" and rec["started_at"] is None, rec
    assert never.attempts == 0


async def test_a_call_too_old_to_start_expires(sqlite_cluster: Cluster) -> None:
    await sqlite_cluster.register(
        Function(app="t", name="echo", image="fnq/echo:latest", memory_mb=64, max_age_s=60)
    )
    old = Call(
        id=new_call_id(),
        app="t",
        fn="echo",
        body=b"late",
        created_at=utcnow() - timedelta(minutes=5),
    )
    fresh = make_calls("t", "echo", 1)[0]
    await sqlite_cluster.enqueue([old, fresh])
    sqlite_cluster.start_worker()
    done = await sqlite_cluster.wait_final([old.id, fresh.id], timeout_s=60)
    assert done[old.id].status is CallStatus.CANCELLED
    assert "expired" in (done[old.id].error or "")
    assert done[fresh.id].status is CallStatus.SUCCESS


async def test_status_lists_the_live_worker(sqlite_cluster: Cluster) -> None:
    await sqlite_cluster.register(SLEEP)
    sqlite_cluster.start_worker()
    for _ in range(100):
        out = sqlite_cluster.fnq("status", "--json")
        # status 1 until the starting worker has made its queue (`no queue at ...`)
        workers = json.loads(out.stdout).get("workers", []) if out.returncode == 0 else []
        if workers:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"no worker in fnq status: {out.stderr}\n"
                             + sqlite_cluster.logs()[-2000:])  # fmt: skip
    assert len(workers) == 1
    sqlite_cluster.stop_all()
    out = sqlite_cluster.fnq("status", "--json")
    assert json.loads(out.stdout).get("workers", []) == []  # a clean stop removes its row


async def test_idle_worker_stops_promptly_on_sigterm(sqlite_cluster: Cluster) -> None:
    sqlite_cluster.env["FN_ASYNC_CHEW_POLL_MSECS"] = "60000"
    worker = sqlite_cluster.start_worker()
    out = ""
    for _ in range(100):  # wait until it is up and waiting for messages
        out = sqlite_cluster.logs()
        if "started" in out:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    began = asyncio.get_running_loop().time()
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 20) == 0, sqlite_cluster.logs()[-2000:]
    assert asyncio.get_running_loop().time() - began < 5.0


def test_a_burst_that_cannot_reach_its_queue_fails(tmp_path: Path, docker_engine: object) -> None:
    down = Cluster(base_env(tmp_path, f"redis://127.0.0.1:{free_port()}/0"), tmp_path)
    out = down.fnq("worker", "--burst")
    assert out.returncode == 1, out.stderr
    last = out.stderr.splitlines()[-1]
    assert last.startswith("fnq: burst stopped with the queue unreachable: redis queue:"), last
    assert "Connection refused" in last

    empty = Cluster(base_env(tmp_path, f"sqlite:///{tmp_path / 'data' / 'mq.db'}"), tmp_path)
    empty.env["FN_LOG_LEVEL"] = "DEBUG"  # what it did, should it not end
    try:
        out = empty.fnq("worker", "--burst")
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a burst on an empty queue did not end; its log: {exc.stderr!r}")
    assert out.returncode == 0, out.stderr  # an empty queue it reached: done
    assert "stopped after 0 call(s) ended here, 0 handed back" in out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("fnq:")]


async def test_a_failed_call_is_retried_with_its_request(sqlite_cluster: Cluster) -> None:
    from worker.calls import FN_CACHE_TTL_S  # noqa: PLC0415 - only this test needs it

    await sqlite_cluster.register(
        Function(app="t", name="flaky", image="fnq/raise:latest", memory_mb=64, max_attempts=1)
    )
    sqlite_cluster.start_worker()
    out = sqlite_cluster.fnq("call", "t", "flaky", "--body", "hello again",
                             "--header", "Content-Type: text/plain", "--priority", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    call_id = out.stdout.strip()
    first = (await sqlite_cluster.wait_final([call_id], timeout_s=60))[call_id]
    assert first.status is CallStatus.ERROR and first.attempts == 1, first

    out = sqlite_cluster.fnq("fn", "update", "t", "flaky", "--image", "fnq/echo:latest")
    assert out.returncode == 0, out.stderr
    await asyncio.sleep(FN_CACHE_TTL_S + 0.5)  # the worker's cached definition goes stale
    out = sqlite_cluster.fnq("calls", "retry", call_id)
    assert (out.returncode, out.stdout.strip()) == (0, call_id), out.stderr

    done = await wait_status(sqlite_cluster, call_id, CallStatus.SUCCESS)
    assert done.response_body == b"hello again"
    assert (done.attempts, done.error, done.image) == (1, None, "fnq/echo:latest")
    assert done.request_body == b"hello again" and done.request_priority == 1
    assert done.created_at > first.created_at


async def test_two_workers_share_the_embedded_sqlite_defaults(sqlite_cluster: Cluster) -> None:
    await sqlite_cluster.register(
        Function(app="t", name="echo", image="fnq/echo:latest", memory_mb=64)
    )
    calls = make_calls("t", "echo", 200)
    await sqlite_cluster.enqueue(calls)
    sqlite_cluster.start_worker()
    sqlite_cluster.start_worker()
    done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=180)
    assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
    assert all(r.attempts == 1 for r in done.values()), "a call ran more than once"
    assert len({r.worker_id for r in done.values()}) == 2, "work was not shared"


async def test_prometheus_metrics_count_outcomes(sqlite_cluster: Cluster) -> None:
    port = free_port()
    sqlite_cluster.env["FN_METRICS_PORT"] = str(port)
    await sqlite_cluster.register(
        Function(app="t", name="echo", image="fnq/echo:latest", memory_mb=64)
    )
    calls = make_calls("t", "echo", 5)
    await sqlite_cluster.enqueue(calls)
    sqlite_cluster.start_worker()
    await sqlite_cluster.wait_final([c.id for c in calls])
    text = ""
    for _ in range(50):  # the counter moves right after the ack
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        if 'fnq_calls_total{status="success"} 5.0' in text:
            break
        await asyncio.sleep(0.1)
    assert 'fnq_calls_total{status="success"} 5.0' in text, text[-2000:]
    assert "fnq_run_seconds_count 5.0" in text
    assert "fnq_memory_total_bytes" in text


async def test_a_call_longer_than_its_reservation_runs_once(redis_cluster: Cluster) -> None:
    # Reservations last 3 s here; the call runs 7 s while a second worker waits for work.
    # Had its reservation lapsed, the second worker would run it in a container of its own.
    app = f"long{new_call_id()[-6:].lower()}"
    await redis_cluster.register(dataclasses.replace(SLEEP, app=app))
    calls = [Call(new_call_id(), app, "sleep", b"7")]
    await redis_cluster.enqueue(calls)
    redis_cluster.start_worker()
    await wait_status(redis_cluster, calls[0].id, CallStatus.RUNNING)
    redis_cluster.start_worker()
    done = await redis_cluster.wait_final([calls[0].id], timeout_s=60)
    rec = done[calls[0].id]
    assert rec.status is CallStatus.SUCCESS, rec.error
    client = docker.from_env(timeout=30)
    try:
        started = client.containers.list(all=True, filters={"label": f"{APP_LABEL}={app}"})
    finally:
        client.close()
    assert len(started) == 1, redis_cluster.logs()[-3000:]


async def test_sigusr1_logs_what_the_worker_waits_for(sqlite_cluster: Cluster) -> None:
    proc = sqlite_cluster.start_worker()
    for _ in range(300):
        if "started" in sqlite_cluster.logs():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no start: " + sqlite_cluster.logs()[-2000:])
    proc.send_signal(signal.SIGUSR1)
    for _ in range(100):
        await asyncio.sleep(0.1)
        if "other thread(s):" in sqlite_cluster.logs():
            break
    log = sqlite_cluster.logs()
    assert "state on request (SIGUSR1): " in log, log[-3000:]
    intake = log.split("task fnq-in-0\n", 1)[1].split("\n  task ", 1)[0]
    assert "worker/loop.py:" in intake and "in Worker._intake" in intake, intake
    assert "mq/sqlite.py:" in intake  # waiting for a message
    assert proc.poll() is None  # still serving
    sqlite_cluster.stop_all()
    assert proc.returncode == 0, log[-3000:]


async def test_a_doubled_stop_signal_lets_running_calls_finish(sqlite_cluster: Cluster) -> None:
    """`timeout`, or Ctrl-C under a process manager, signals the worker twice at once:
    that is one stop request, and the running call gets its grace period."""
    await sqlite_cluster.register(SLEEP)
    call = make_calls("t", "sleep", 1, body=b"3")[0]
    await sqlite_cluster.enqueue([call])
    worker = sqlite_cluster.start_worker()
    await wait_status(sqlite_cluster, call.id, CallStatus.RUNNING)
    loop = asyncio.get_running_loop()
    first = loop.time()
    worker.send_signal(signal.SIGTERM)
    # Once it took the first (two sent at once may reach it as one), the second.
    while "stopping (SIGTERM)" not in sqlite_cluster.logs():
        await asyncio.sleep(0.005)
    worker.send_signal(signal.SIGTERM)
    assert loop.time() - first < 0.9, "the worker took too long to log its first signal"
    assert await asyncio.to_thread(worker.wait, 60) == 0, sqlite_cluster.logs()[-2000:]
    logs = sqlite_cluster.logs()
    assert "SIGTERM again within 1 s of the first: the same stop request" in logs, logs[-2000:]
    assert "second stop request" not in logs
    done = await sqlite_cluster.wait_final([call.id], timeout_s=10)
    assert done[call.id].status is CallStatus.SUCCESS, done[call.id]
    assert done[call.id].attempts == 1
