"""Workers and commands on hosts whose wall clocks are a minute or two apart, sharing
one Redis queue and one PostgreSQL datastore (docs/worker.md, "Clocks across hosts").

Every time a record holds, and every decision made by comparing such times, is
read from PostgreSQL's clock, so a host's skew changes none of them: a call's age,
whether a worker is alive, whether its attempt may still be under way, when a
buried call's record last changed, which calls a purge deletes, the order of
`fnq calls list`, which definition of a function is the newest. Redis's clock
decides when a delayed call is due and when a reservation lapses. The last test
steps the clock of a worker on SQLite (the host's clock is its datastore's).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from config.domain import CallStatus, FailureKind, Function
from datastore.base import CallRecord, open_datastore
from tests.clocks.conftest import skewed
from tests.worker.conftest import Cluster, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST = os.uname().nodename
ECHO = Function(app="clk", name="echo", image="fnq/echo:latest", memory_mb=64, timeout_s=20,
                max_age_s=30)  # fmt: skip
SLEEP = Function(app="clk", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=20)
POLL_S = 0.05


def worker_id(proc: subprocess.Popen[bytes]) -> str:
    return f"{HOST}:{proc.pid}"


async def records(cluster: Cluster, ids: list[str]) -> dict[str, CallRecord]:
    store = await open_datastore(cluster.settings)
    try:
        return await store.get_calls(ids)
    finally:
        await store.close()


async def wait_record(
    cluster: Cluster,
    call_id: str,
    done: Callable[[CallRecord], bool],
    what: str,
    timeout_s: float = 30,
) -> CallRecord:
    """The call's record once ``done`` says so; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        rec = (await records(cluster, [call_id])).get(call_id)
        if rec is not None and done(rec):
            return rec
        if time.monotonic() > deadline:
            raise AssertionError(
                f"call {call_id} not {what} after {timeout_s}s: {rec}\n"
                f"--- worker logs ---\n{cluster.logs()[-5000:]}"
            )
        await asyncio.sleep(POLL_S)


async def wait_log(cluster: Cluster, text: str, times: int = 1, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while cluster.logs().count(text) < times:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not {times} time(s) in the logs after {timeout_s}s:"
                                 f"\n{cluster.logs()[-5000:]}")  # fmt: skip
        await asyncio.sleep(POLL_S)


def running_on(proc: subprocess.Popen[bytes]) -> Callable[[CallRecord], bool]:
    return lambda r: r.status is CallStatus.RUNNING and r.worker_id == worker_id(proc)


def fnq_ok(cluster: Cluster, *args: str, env: dict[str, str] | None = None) -> str:
    done = cluster.fnq(*args, env=env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


async def test_a_process_started_skewed_reads_its_wall_clock_that_far_off(
    hosts: Cluster,
) -> None:
    code = "from config.domain import utcnow; print(utcnow().timestamp())"
    out = subprocess.run([sys.executable, "-c", code], env=skewed(hosts.env, -90),
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert abs(float(out.stdout) - (time.time() - 90)) < 5


async def test_a_worker_ahead_runs_a_fresh_call_within_its_max_age(hosts: Cluster) -> None:
    await hosts.register(ECHO)
    hosts.start_worker(env=skewed(hosts.env, 60))
    call_id = fnq_ok(hosts, "call", "clk", "echo", "--body", "fresh").strip()
    rec = await wait_record(hosts, call_id, lambda r: r.status.is_final, "final")
    assert rec.status is CallStatus.SUCCESS, rec
    await wait_log(hosts, "s ahead of the datastore's; the times stored and compared are")


async def test_a_worker_ahead_leaves_a_call_to_the_live_worker_that_runs_it(
    hosts: Cluster,
) -> None:
    """Worker A's reservation lapses while it is stopped (SIGSTOP) for a few seconds,
    long before its heartbeat would be stale; worker B, a minute ahead, is given the
    call and must leave it to A."""
    await hosts.register(SLEEP)
    a = hosts.start_worker()
    [call] = make_calls("clk", "sleep", 1, b"6")
    await hosts.enqueue([call])
    await wait_record(hosts, call.id, running_on(a), "running on A")
    b = hosts.start_worker(env=skewed(hosts.env, 60))
    await wait_log(hosts, f"worker {worker_id(b)} started")
    a.send_signal(signal.SIGSTOP)
    try:
        await wait_log(hosts, f"delivered again while worker {worker_id(a)} runs it")
    finally:
        a.send_signal(signal.SIGCONT)
    rec = await wait_record(hosts, call.id, lambda r: r.status.is_final, "final")
    assert (rec.status, rec.attempts, rec.worker_id) == (CallStatus.SUCCESS, 1, worker_id(a))


async def test_a_call_buried_by_a_worker_behind_the_one_that_marked_it_ends_as_error(
    hosts: Cluster,
) -> None:
    """Worker A, a minute ahead, marks the call `running` and is killed; its message,
    delivered once already, is buried by worker B's next reserve. The record was
    last changed before the burial, and ends."""
    hosts.env["FN_MQ_MAX_DELIVERIES"] = "1"
    await hosts.register(SLEEP)
    a = hosts.start_worker(env=skewed(hosts.env, 60))
    [call] = make_calls("clk", "sleep", 1, b"15")
    await hosts.enqueue([call])
    await wait_record(hosts, call.id, running_on(a), "running on A")
    a.kill()
    a.wait(10)
    hosts.start_worker()
    rec = await wait_record(hosts, call.id, lambda r: r.status.is_final, "final", timeout_s=20)
    assert (rec.status, rec.failure) == (CallStatus.ERROR, FailureKind.TERMINAL), rec
    assert rec.error is not None and "reservation lapsed" in rec.error


async def test_a_worker_behind_takes_delayed_calls_when_due_and_a_dead_workers_calls(
    hosts: Cluster,
) -> None:
    """Redis's clock decides when a delayed call is due and when a reservation has
    lapsed: a worker a minute behind takes both in time, as any worker does."""
    await hosts.register(SLEEP)
    a = hosts.start_worker()
    [held] = make_calls("clk", "sleep", 1, b"10")
    await hosts.enqueue([held])
    await wait_record(hosts, held.id, running_on(a), "running on A")
    a.kill()
    a.wait(10)
    b = hosts.start_worker(env=skewed(hosts.env, -60))
    rec = await wait_record(hosts, held.id, running_on(b), "running on B", timeout_s=15)
    assert rec.attempts == 2
    delayed = fnq_ok(hosts, "call", "clk", "sleep", "--body", "0", "--delay", "3").strip()
    rec = await wait_record(hosts, delayed, lambda r: r.status.is_final, "final")
    assert rec.status is CallStatus.SUCCESS and rec.worker_id == worker_id(b), rec
    assert rec.started_at is not None
    assert timedelta(seconds=3) <= rec.started_at - rec.created_at < timedelta(seconds=8)


async def test_calls_are_listed_newest_first_whichever_host_queued_them(
    hosts: Cluster,
) -> None:
    await hosts.register(ECHO)
    ahead = skewed(hosts.env, 60)
    first = fnq_ok(hosts, "call", "clk", "echo", env=ahead).strip()
    second = fnq_ok(hosts, "call", "clk", "echo").strip()
    for env in (hosts.env, ahead):
        listed = json.loads(fnq_ok(hosts, "calls", "list", "--json", env=env))["items"]
        assert [c["id"] for c in listed] == [second, first]
        recent = json.loads(fnq_ok(hosts, "calls", "list", "--since", "30s", "--json", env=env))
        assert [c["id"] for c in recent["items"]] == [second, first]


async def test_status_on_a_host_ahead_lists_the_live_workers(hosts: Cluster) -> None:
    store = await open_datastore(hosts.settings)
    try:
        await store.worker_heartbeat("w-1", {"containers": 0})
    finally:
        await store.close()
    out = json.loads(fnq_ok(hosts, "status", "--json", env=skewed(hosts.env, 60)))
    assert [w["id"] for w in out["workers"]] == ["w-1"]
    assert out["workers"][0]["seen_s_ago"] < 10


async def test_a_purge_keeps_the_calls_younger_than_asked_whichever_hosts_ran_and_purge(
    hosts: Cluster,
) -> None:
    await hosts.register(ECHO)
    hosts.start_worker(env=skewed(hosts.env, -120))
    call_id = fnq_ok(hosts, "call", "clk", "echo").strip()
    rec = await wait_record(hosts, call_id, lambda r: r.status.is_final, "final")
    assert rec.status is CallStatus.SUCCESS, rec
    out = fnq_ok(hosts, "calls", "purge", "--older-than", "3m", env=skewed(hosts.env, 120))
    assert out.startswith("purged 0 calls"), out
    assert call_id in await records(hosts, [call_id])


async def test_definitions_changed_from_hosts_apart_retire_the_containers_of_the_older(
    hosts: Cluster,
) -> None:
    """The definition changed last is the newest, though the host that changed it
    before was a minute ahead: the worker retires the containers of the one before."""
    fn = Function(app="clk", name="env", image="fnq/env:latest", memory_mb=64,
                  idle_timeout_s=600)  # fmt: skip
    await hosts.register(fn)
    hosts.start_worker()
    retired = "retired: the function's definition changed"

    async def env_of_a_call() -> dict[str, str]:
        call_id = fnq_ok(hosts, "call", "clk", "env").strip()
        rec = await wait_record(hosts, call_id, lambda r: r.status.is_final, "final")
        assert rec.status is CallStatus.SUCCESS, rec
        env: dict[str, str] = json.loads(rec.response_body)
        return env

    assert "V" not in await env_of_a_call()  # a container of the first definition
    fnq_ok(hosts, "fn", "update", "clk", "env", "--config", "V=1", env=skewed(hosts.env, 60))
    for _ in range(30):  # until a call runs in a container of the second definition
        if (await env_of_a_call()).get("V") == "1":
            break
    else:
        raise AssertionError(f"no call saw the second definition:\n{hosts.logs()[-4000:]}")
    before = hosts.logs().count(retired)  # the first definition's container, at least
    fnq_ok(hosts, "fn", "update", "clk", "env", "--config", "V=2")
    await wait_log(hosts, retired, times=before + 1)  # at the worker's next look
    assert (await env_of_a_call()).get("V") == "2"


async def test_a_clock_step_during_a_call_leaves_its_run_time_as_it_was(
    sqlite_cluster: Cluster,
) -> None:
    """The host's clock steps an hour ahead while the call runs: the record's start
    and end are an hour apart on the wall clock, but the call ran for 3 s."""
    cluster = sqlite_cluster
    step = cluster.tmp / "step-now"
    await cluster.register(SLEEP)
    worker = cluster.start_worker(env=skewed(cluster.env, 0, step_s=3600, step_file=step))
    [call] = make_calls("clk", "sleep", 1, b"3")
    await cluster.enqueue([call])
    await wait_record(cluster, call.id, running_on(worker), "running")
    step.touch()
    rec = await wait_record(cluster, call.id, lambda r: r.status.is_final, "final")
    assert rec.status is CallStatus.SUCCESS, rec
    assert rec.started_at is not None and rec.completed_at is not None
    assert timedelta(seconds=2.5) < rec.completed_at - rec.started_at < timedelta(seconds=10)
