"""Workers and commands on hosts whose wall clocks are a minute or two apart, sharing
one Redis queue and one PostgreSQL datastore (docs/worker.md, "Clocks across hosts").

Every time a record holds, and every decision made by comparing such times, is
read from PostgreSQL's clock, so a host's skew changes none of them: a call's age,
whether a worker is alive, whether its attempt may still be under way, when a
buried call's record last changed, which calls a purge deletes, the order of
`fnq calls list`, which definition of a function is the newest.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from config.domain import CallStatus, Function
from datastore.base import CallRecord, open_datastore
from tests.clocks.conftest import skewed
from tests.worker.conftest import Cluster

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
