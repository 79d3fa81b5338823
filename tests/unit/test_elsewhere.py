"""worker.elsewhere: which `running` records another live worker may still be running,
and how often the live workers are read for that."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import timedelta

import pytest

from config.domain import CallStatus, Function, new_call_id, pid_namespace, utcnow
from datastore.base import CallRecord, WorkerInfo
from datastore.clock import StoreClock
from datastore.errors import StoreUnavailable
from worker import elsewhere
from worker.elsewhere import Elsewhere

FN = Function(app="a", name="f", image="img/f", timeout_s=10)


class Workers:
    """A datastore with only its live workers; counts the reads."""

    def __init__(self, *ids: str, pidns: dict[str, str] | None = None) -> None:
        self.ids = ids
        self.pidns = pidns or {}  # a worker's pid namespace, as its heartbeat tells it
        self.reads = 0
        self.fail: Exception | None = None
        self.answer = asyncio.Event()
        self.answer.set()
        self.clock = StoreClock()  # this host's wall clock until set

    async def list_workers(self, seen_within: timedelta) -> list[WorkerInfo]:
        assert seen_within == timedelta(seconds=30)
        self.reads += 1
        await self.answer.wait()
        if self.fail is not None:
            raise self.fail
        now = utcnow()
        return [
            WorkerInfo(i, "host", 1, now, now, {"pidns": self.pidns[i]} if i in self.pidns else {})
            for i in self.ids
        ]


def record(status: CallStatus, worker_id: str | None, marked_s_ago: float = 0.0) -> CallRecord:
    now = utcnow()
    marked = now - timedelta(seconds=marked_s_ago)
    return CallRecord(
        id=new_call_id(), app="a", fn="f", status=status, created_at=marked,
        updated_at=marked, started_at=marked, worker_id=worker_id,
    )  # fmt: skip


async def test_only_a_record_running_on_another_live_worker_within_its_timeout() -> None:
    store = Workers("w-a")
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    assert await here.runs(record(CallStatus.RUNNING, "w-a"), FN) == "w-a"
    assert await here.runs(record(CallStatus.RUNNING, "w-a", marked_s_ago=14), FN) == "w-a"
    assert await here.runs(record(CallStatus.RUNNING, "w-a", marked_s_ago=16), FN) is None
    assert await here.runs(record(CallStatus.RUNNING, "w-gone"), FN) is None
    assert await here.runs(record(CallStatus.RUNNING, "w-b"), FN) is None  # this worker's
    assert await here.runs(record(CallStatus.RUNNING, None), FN) is None
    assert await here.runs(record(CallStatus.QUEUED, "w-a"), FN) is None
    assert store.reads == 1  # only running records read the workers, and once


async def test_a_record_is_as_old_as_the_datastore_clock_says_whatever_this_host_says() -> None:
    """This host's clock is a minute ahead of the datastore's, by which the record was
    marked 14 s ago: its attempt may still be under way (timeout 10 s + slack 5 s)."""
    store = Workers("w-a")
    m = time.monotonic()
    store.clock.set(utcnow() - timedelta(seconds=60), m, m)
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    marked = record(CallStatus.RUNNING, "w-a", marked_s_ago=60 + 14)
    assert await here.runs(marked, FN) == "w-a"
    assert await here.runs(record(CallStatus.RUNNING, "w-a", marked_s_ago=60 + 16), FN) is None


async def test_calls_that_ask_together_share_one_read_kept_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Workers("w-a")
    store.answer.clear()
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    asks = [asyncio.ensure_future(here.runs(record(CallStatus.RUNNING, "w-a"), FN))]
    asks += [asyncio.ensure_future(here.runs(record(CallStatus.RUNNING, "w-a"), FN))]
    await asyncio.sleep(0.01)
    asks[0].cancel()  # one that gives up does not cancel the others' read
    store.answer.set()
    assert await asks[1] == "w-a"
    assert await here.runs(record(CallStatus.RUNNING, "w-a"), FN) == "w-a"
    assert store.reads == 1
    monkeypatch.setattr(elsewhere, "LIVE_TTL_S", 0.0)
    assert await here.runs(record(CallStatus.RUNNING, "w-a"), FN) == "w-a"
    assert store.reads == 2


async def test_a_failed_read_fails_the_call_and_is_not_kept() -> None:
    store = Workers("w-a")
    store.fail = StoreUnavailable("connection refused")
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await here.runs(record(CallStatus.RUNNING, "w-a"), FN)
    store.fail = None
    assert await here.runs(record(CallStatus.RUNNING, "w-a"), FN) == "w-a"
    assert store.reads == 2


async def test_a_read_that_hangs_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(elsewhere, "LIVE_READ_TIMEOUT_S", 0.05)
    store = Workers("w-a")
    store.answer.clear()
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match=r"could not be read within 0\.05 s"):
        await here.runs(record(CallStatus.RUNNING, "w-a"), FN)


async def test_a_worker_of_this_host_whose_process_is_gone_runs_nothing() -> None:
    """Killed with SIGKILL, a worker leaves a heartbeat that is fresh for 30 s more:
    on its own host its process tells that it is gone, and the call runs again at once."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename
    gone, live = f"{host}:{dead.pid}", f"{host}:{os.getpid()}"
    ours = pid_namespace()
    assert ours  # Linux: /proc/self/ns/pid
    store = Workers(gone, live, "elsewhere:1", pidns={gone: ours, live: ours})
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    assert await here.runs(record(CallStatus.RUNNING, gone), FN) is None
    assert await here.runs(record(CallStatus.RUNNING, live), FN) == live
    assert await here.runs(record(CallStatus.RUNNING, "elsewhere:1"), FN) == "elsewhere:1"


@pytest.mark.parametrize("pidns", ["4026531999", None], ids=["another-namespace", "not-told"])
async def test_a_pid_of_another_namespace_is_not_judged(pidns: str | None) -> None:
    """Workers in containers that share the host's name (``--network host``) each have
    pids of their own: a pid that does not run here says nothing of that worker."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = f"{os.uname().nodename}:{dead.pid}"
    store = Workers(other, pidns={other: pidns} if pidns else None)
    here = Elsewhere(store, "w-b")  # type: ignore[arg-type]
    assert await here.runs(record(CallStatus.RUNNING, other), FN) == other
