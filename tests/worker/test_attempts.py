"""What a call's ``attempts`` counts: runs in a container (those the worker's shutdown
stopped too), and starts of its function's container that failed; a call that never
reached a container counts none.

In-process worker on the embedded SQLite queue and datastore, with the fake
container driver.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from config.domain import (
    Call,
    CallStatus,
    FailureKind,
    Function,
    Outcome,
    frozen_map,
    new_call_id,
    utcnow,
)
from config.settings import load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import open_queue
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, hang, reply
from worker.agent.errors import ContainerInitFailed, ImageNotFound
from worker.loop import Worker
from worker.shutdown import Shutdown

MIB = 1024 * 1024
MISSING = Function(app="a", name="missing", image="img/missing", memory_mb=64)
TOO_BIG = Function(app="a", name="big", image="img/big", memory_mb=512)
BROKEN = Function(app="a", name="broken", image="img/broken", memory_mb=64, max_attempts=1)
DRIVER = {
    MISSING.image: FakeBehaviour(create_error=ImageNotFound("image img/missing not found")),
    BROKEN.image: FakeBehaviour(start_error=ContainerInitFailed("exited before it was ready")),
}


async def run_until_final(
    tmp_path: Path, mark_ms: int, calls: list[Call], prepare: Any = None
) -> dict[str, CallRecord]:
    settings = load_settings(
        data_dir=str(tmp_path), running_mark_msecs=mark_ms, max_total_memory_bytes=256 * MIB
    )
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    try:
        for fn in (MISSING, TOO_BIG, BROKEN):
            await store.create_fn(fn)
        for call in calls:
            await store.record_queued(call)
        if prepare is not None:
            await prepare(store)
        await queue.push_many(calls)
        async with Agent(settings, FakeDriver(per_image=DRIVER)) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                async with asyncio.timeout(30):
                    while None in [await final(store, c) for c in calls]:
                        await asyncio.sleep(0.02)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        return {c.id: rec for c in calls if (rec := await final(store, c)) is not None}
    finally:
        await queue.close()
        await store.close()


async def final(store: Datastore, call: Call) -> CallRecord | None:
    rec = await store.get_call(call.id)
    return rec if rec is not None and rec.status.is_final else None


@pytest.mark.parametrize("mark_ms", [0, 50])  # marked `running` first, or not
async def test_a_call_that_never_reached_a_container_counts_no_attempt(
    tmp_path: Path, mark_ms: int, caplog: pytest.LogCaptureFixture
) -> None:
    missing, big = Call(new_call_id(), "a", "missing"), Call(new_call_id(), "a", "big")
    unknown = Call(new_call_id(), "a", "unregistered")
    broken = Call(new_call_id(), "a", "broken")
    with caplog.at_level(logging.INFO, logger="fnq.worker"):
        done = await run_until_final(tmp_path, mark_ms, [missing, big, unknown, broken])
    # The worker's log says how each ended, and that its message went to the dead letters.
    assert (f"call {unknown.id} ended error without running: function a/unregistered is "
            "not registered; its message goes to the dead letters") in caplog.text  # fmt: skip
    said = {
        missing.id: "without running: image img/missing not found",
        big.id: "without running: ",
        broken.id: "after 1 attempt(s): ",
    }
    logged = [r.getMessage() for r in caplog.records]
    for call_id, how in said.items():
        line = next(m for m in logged if f"call {call_id} ended" in m)
        assert line.startswith(f"call {call_id} ended error {how}"), line
        assert line.endswith("; its message goes to the dead letters"), line
    assert "not found" in (done[missing.id].error or "")
    assert "more than this worker has" in (done[big.id].error or "")
    assert "not registered" in (done[unknown.id].error or "")
    for call in (missing, big, unknown):
        rec = done[call.id]
        assert (rec.status, rec.attempts, rec.started_at) == (CallStatus.ERROR, 0, None), rec
    # A container of the function that fails to start is the function's fault: it
    # counts, and max_attempts (1 here) bounds it.
    rec = done[broken.id]
    assert (rec.status, rec.failure, rec.attempts) == (CallStatus.ERROR, FailureKind.FUNCTION, 1)


async def test_a_call_ended_before_it_starts_keeps_the_count_of_its_runs(tmp_path: Path) -> None:
    ran_once = Call(new_call_id(), "a", "gone")  # its function was deleted after one run

    async def one_failed_run(store: Datastore) -> None:
        now = utcnow()
        failed = Outcome(CallStatus.ERROR, "crashed", FailureKind.FUNCTION,
                         started_at=now, completed_at=now)  # fmt: skip
        await store.record_running(ran_once, 0, "another-worker")
        await store.record_retry(ran_once, failed, 1, now + timedelta(seconds=-1))

    done = await run_until_final(tmp_path, 50, [ran_once], prepare=one_failed_run)
    rec = done[ran_once.id]
    assert (rec.status, rec.attempts) == (CallStatus.ERROR, 1), rec
    assert "not registered" in (rec.error or "")


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_a_run_stopped_by_shutdown_counts_and_failures_still_end_the_call(
    tmp_path: Path, max_attempts: int
) -> None:
    """``attempts`` counts the times the function ran, a run the worker's shutdown
    stopped too; failures end the call for good once attempts reach max_attempts. With
    max_attempts 2, the stopped run and one failure make two: no third run. With 1,
    the stopped run was the last allowed one: the call runs once more (the stop is no
    failure), and its record shows 2 attempts."""
    settings = load_settings(
        data_dir=str(tmp_path), mq_reservation_msecs=60_000, running_mark_msecs=0
    )
    fn = Function(app="a", name="fails", image="img/fails", memory_mb=64,
                  max_attempts=max_attempts, retry_backoff_s=0.01)  # fmt: skip
    call = Call(new_call_id(), fn.app, fn.name, b"x")
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    try:
        await store.create_fn(fn)
        await store.record_queued(call)
        await queue.push(call)
        stopped = FakeDriver(FakeBehaviour(handler=hang()))
        async with Agent(settings, stopped) as agent:
            shutdown = Shutdown(30.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                await stopped.wait_until(lambda: stopped.dispatches == 1, timeout_s=10)
            finally:
                shutdown.abort()
                await asyncio.wait_for(run, 10)
        rec = await store.get_call(call.id)
        assert rec is not None and (rec.status, rec.attempts) == (CallStatus.QUEUED, 1), rec

        failing = FakeDriver(FakeBehaviour(handler=reply(502, b"no")))
        async with Agent(settings, failing) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                async with asyncio.timeout(30):
                    while await final(store, call) is None:
                        await asyncio.sleep(0.02)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        rec = await store.get_call(call.id)
        assert rec is not None and rec.status is CallStatus.ERROR, rec
        assert failing.dispatches == 1  # one failure: the budget was used up by then
        assert rec.attempts == 2
        assert [d.id for d in await queue.dead_list(10)] == [call.id]
    finally:
        await queue.close()
        await store.close()


async def answer_then_stop_accepting(
    container: FakeContainer, request: DispatchRequest
) -> DispatchResult:
    """Answer, then accept no connection any more (the next call waits in the backlog)."""
    container.stop_accepting()
    return DispatchResult(200, frozen_map(), request.body)


@pytest.mark.parametrize("mark_ms", [0, 50])  # marked `running` at the connect, or not
@pytest.mark.parametrize("max_attempts", [1, 3])
async def test_a_call_its_container_never_accepted_counts_as_failed_by_its_function(
    tmp_path: Path, mark_ms: int, max_attempts: int
) -> None:
    """The function answers a call, then accepts no connection any more: the next call
    waits in its backlog for its timeout. It never reached the function, but the
    function failed it, as a container that never starts does: the attempt counts, the
    stuck container goes, and the call is retried on a new one while attempts remain
    (with one, it ends there, with the reason)."""
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=mark_ms)
    fn = Function(app="a", name="stuck", image="img/stuck", memory_mb=64, timeout_s=1,
                  max_attempts=max_attempts, retry_backoff_s=0.01)  # fmt: skip

    driver = FakeDriver(FakeBehaviour(handler=answer_then_stop_accepting))
    first, second = (Call(new_call_id(), fn.app, fn.name, body) for body in (b"1", b"2"))
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    try:
        await store.create_fn(fn)
        async with Agent(settings, driver) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                async with asyncio.timeout(30):
                    for call in (first, second):  # one after the other: the same container
                        await store.record_queued(call)
                        await queue.push(call)
                        while await final(store, call) is None:
                            await asyncio.sleep(0.02)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        done = {call.id: await store.get_call(call.id) for call in (first, second)}
    finally:
        await queue.close()
        await store.close()
    rec = done[first.id]
    assert rec is not None and (rec.status, rec.attempts) == (CallStatus.SUCCESS, 1), rec
    rec = done[second.id]
    assert rec is not None, rec
    assert driver.containers[0].state == "removed"
    if max_attempts == 1:
        assert (rec.status, rec.attempts) == (CallStatus.ERROR, 1), rec
        assert rec.error is not None and "did not accept the call within 1 s" in rec.error
        assert driver.dispatches == 1  # it never reached a function
    else:
        assert (rec.status, rec.attempts) == (CallStatus.SUCCESS, 2), rec  # failed, then ran
        assert driver.dispatches == 2 and driver.creates == 2


async def test_a_call_its_container_never_accepted_goes_back_counted_at_a_stop(
    tmp_path: Path,
) -> None:
    """The worker is asked to stop while a call waits for a function that never accepts
    its connection (marked `running` meanwhile: the socket took the connection); its
    timeout comes within the stop's grace. The function failed it: it goes back to the
    queue for its retry as `queued`, its attempt counted once (the mark's, not twice)."""
    settings = load_settings(data_dir=str(tmp_path), running_mark_msecs=0)
    fn = Function(app="a", name="stuck", image="img/stuck", memory_mb=64, timeout_s=1)
    driver = FakeDriver(FakeBehaviour(handler=answer_then_stop_accepting))
    first, second = (Call(new_call_id(), fn.app, fn.name, body) for body in (b"1", b"2"))
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    try:
        await store.create_fn(fn)
        async with Agent(settings, driver) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                async with asyncio.timeout(30):
                    await store.record_queued(first)
                    await queue.push(first)
                    while await final(store, first) is None:
                        await asyncio.sleep(0.02)
                    await store.record_queued(second)
                    await queue.push(second)
                    while (rec := await store.get_call(second.id)) is None or (
                        rec.status is not CallStatus.RUNNING
                    ):
                        await asyncio.sleep(0.02)
                    assert rec.attempts == 1  # counted while it seemed to run
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        rec = await store.get_call(second.id)
    finally:
        await queue.close()
        await store.close()
    assert rec is not None and (rec.status, rec.attempts, rec.started_at) == (
        CallStatus.QUEUED,
        1,
        None,
    ), rec
    assert driver.dispatches == 1  # only the first call reached a function
