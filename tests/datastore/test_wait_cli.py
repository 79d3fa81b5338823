"""``fnq calls wait``: calls followed to their end in the datastore (no worker needed)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, FailureKind, Outcome, Response, new_call_id
from config.settings import load_settings
from datastore.base import CallRecord, open_datastore
from datastore.errors import StoreUnavailable
from datastore.wait import MIN_READ_S, wait_for_calls
from tests.datastore.test_cli import FNQ
from worker.cli._common import EXIT_TIMED_OUT

OK = Outcome(CallStatus.SUCCESS, response=Response(200, {}, b"done"))
FAILED = Outcome(CallStatus.ERROR, error="function failed: boom", failure=FailureKind.FUNCTION)


def queued(n: int) -> list[Call]:
    calls = [Call(new_call_id(), "shop", "resize", b"in") for _ in range(n)]

    async def run() -> None:
        store = await open_datastore(load_settings())
        try:
            for call in calls:
                await store.record_queued(call, "img:1")
        finally:
            await store.close()

    asyncio.run(run())
    return calls


def end(call: Call, outcome: Outcome) -> None:
    async def run() -> None:
        store = await open_datastore(load_settings())
        try:
            await store.record_outcome(call, outcome, 1, "w")
        finally:
            await store.close()

    asyncio.run(run())


def wait(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [FNQ, "calls", "wait", *args],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_wait_reports_each_call_as_it_ends(settings_env: Path) -> None:
    first, second = queued(2)
    proc = wait(first.id, second.id, "--timeout", "60")
    time.sleep(0.5)
    assert proc.poll() is None  # neither has ended: it waits
    end(second, OK)
    time.sleep(0.5)
    assert proc.poll() is None  # one still to go
    t0 = time.monotonic()
    end(first, FAILED)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 5  # seen within a few polls, not at the timeout
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [[second.id, "success"], [first.id, "error"]]
    assert lines[1].endswith("function failed: boom")
    assert proc.returncode == 1, err  # one ended other than success
    assert err == ""


def test_wait_for_ended_calls_returns_at_once(settings_env: Path) -> None:
    calls = queued(2)
    for call in calls:
        end(call, OK)
    proc = wait(*[c.id for c in calls], "--json")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    docs = json.loads(out)
    assert [(d["id"], d["status"]) for d in docs] == [(c.id, "success") for c in calls]
    assert docs[0]["response"]["body"] == "done"


def test_wait_that_runs_out_names_what_has_not_ended(settings_env: Path) -> None:
    (call,) = queued(1)
    unknown = new_call_id()
    t0 = time.monotonic()
    proc = wait(call.id, unknown, "--timeout", "0.5", "--json")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_TIMED_OUT
    assert time.monotonic() - t0 < 10
    assert f"{call.id} (queued)" in err and f"{unknown} (no record yet)" in err
    docs = json.loads(out)
    assert [(d["id"], d["status"]) for d in docs] == [(call.id, "queued"), (unknown, None)]


def test_a_timeout_that_is_not_a_number_is_a_usage_error(settings_env: Path) -> None:
    """``nan`` passes every range check: taken, it waited for ever."""
    (call,) = queued(1)
    proc = wait(call.id, "--timeout", "nan")
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (2, "")
    assert err == "fnq: Invalid value for '--timeout': 'nan' is not a number of seconds\n"


class HungStore:
    """A datastore whose reads never answer."""

    async def get_calls(self, call_ids: object) -> dict[str, CallRecord]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_hung_read_ends_the_wait_by_its_timeout() -> None:
    t0 = time.monotonic()
    waited = await wait_for_calls(HungStore(), ["a"], 0.2)  # type: ignore[arg-type]
    assert waited.pending == ["a"] and waited.records == {}
    assert time.monotonic() - t0 < MIN_READ_S + 1


async def test_a_hung_read_without_a_timeout_is_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("datastore.wait.READ_TIMEOUT_S", 0.2)
    with pytest.raises(StoreUnavailable, match=r"took longer than 0\.2 s"):
        await wait_for_calls(HungStore(), ["a"], None)  # type: ignore[arg-type]
