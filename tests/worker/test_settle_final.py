"""A delivery of a call whose record is final already goes where the call's end sent it.

Such a delivery comes when the settle of the call's message failed (a queue outage as
it was acked or dead-lettered: the reservation lapses and the message comes back),
or when a producer pushes an ended call's id again. A call that ended `error` or
`timeout` went to the dead letters; so does its late delivery, instead of being
acked away where `fnq dead list` never shows it.

In-process worker on the embedded SQLite queue and datastore (or the RQ bridge on a
real Redis), with the fake driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from config.domain import (
    Call,
    CallStatus,
    FailureKind,
    Function,
    Outcome,
    Response,
    frozen_map,
    new_call_id,
    utcnow,
)
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import open_queue
from mq.rq import open_rq_queues
from mq.rq_jobs import finish_of
from tests.rig import RedisServer
from worker.agent.agent import Agent
from worker.agent.drivers.fake import FakeDriver
from worker.loop import Worker
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)
RQ_DB = 9  # other suites use 0, 7 and 8
ENDS = {
    CallStatus.ERROR: ("the function failed", FailureKind.FUNCTION),
    CallStatus.TIMEOUT: ("the function ran longer than 30 s", FailureKind.FUNCTION),
    CallStatus.SUCCESS: (None, None),
    CallStatus.CANCELLED: ("cancelled on request", FailureKind.CANCELLED),
}


async def test_a_late_delivery_of_an_ended_call_goes_where_its_end_sent_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    queue = open_queue(settings.mq_url, settings)
    calls = {status: Call(new_call_id(), "a", "f", b"again") for status in ENDS}
    try:
        await store.create_fn(FN)
        for status, call in calls.items():
            error, failure = ENDS[status]
            now = utcnow()
            ended = Outcome(status, error, failure, started_at=now, completed_at=now)
            assert await store.record_outcome(call, ended, 2, "another-worker")
        await queue.push_many(list(calls.values()))
        with caplog.at_level(logging.INFO, logger="fnq.worker"):
            async with Agent(settings, FakeDriver()) as agent:
                shutdown = Shutdown(5.0)
                run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
                try:
                    async with asyncio.timeout(30):
                        while (stats := await queue.stats()).ready + stats.reserved:
                            await asyncio.sleep(0.02)
                finally:
                    shutdown.request("test over")
                    await asyncio.wait_for(run, 30)
        dead = {d.id: d.reason for d in await queue.dead_list(10)}
        assert dead == {
            calls[CallStatus.ERROR].id: "the function failed",
            calls[CallStatus.TIMEOUT].id: "the function ran longer than 30 s",
        }
        for status, call in calls.items():  # none ran again: the records are as they were
            record = await store.get_call(call.id)
            assert record is not None and (record.status, record.attempts) == (status, 2)
        error_id = calls[CallStatus.ERROR].id
        said = f"call {error_id} is already error: settling its message (to the dead letters)"
        assert said in caplog.text
    finally:
        await queue.close()
        await store.close()


async def test_a_late_delivery_of_an_ended_rq_job_fails_it_with_the_same_text(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """On the RQ bridge a late delivery (its first `complete` could not reach rq, say)
    fails the job with the text its first settle would have given: why the call
    ended, with the kind of failure, as the call's record has it."""
    url = f"redis://127.0.0.1:{redis_server.port}/{RQ_DB}"
    conn = Redis.from_url(url)
    conn.flushdb()
    settings = load_settings(data_dir=str(tmp_path))
    store = await open_datastore(settings)
    queue = open_rq_queues(url, ["default"], settings)
    producer = Queue("default", connection=conn, serializer="json")
    ends = [
        Outcome(CallStatus.ERROR, "container was killed: out of memory (limit 64 MB)",
                FailureKind.FUNCTION),
        Outcome(CallStatus.TIMEOUT, "the function ran longer than 30 s", FailureKind.FUNCTION),
        Outcome(CallStatus.ERROR, "function failed: boom", FailureKind.FUNCTION,
                response=Response(502, frozen_map({}), b"boom")),
    ]  # fmt: skip
    jobs = [producer.enqueue("fnq.call", app="a", fn="f", body="again") for _ in ends]
    try:
        await store.create_fn(FN)
        for job, end in zip(jobs, ends, strict=True):
            now = utcnow()
            ended = dataclasses.replace(end, started_at=now, completed_at=now)
            call = Call(job.id, "a", "f", b"again")
            assert await store.record_outcome(call, ended, 3, "another-worker")
        async with Agent(settings, FakeDriver()) as agent:
            shutdown = Shutdown(5.0)
            run = asyncio.create_task(Worker(settings, queue, store, agent).run(shutdown))
            try:
                async with asyncio.timeout(30):
                    while any(j.get_status(refresh=True) != "failed" for j in jobs):
                        await asyncio.sleep(0.02)
            finally:
                shutdown.request("test over")
                await asyncio.wait_for(run, 30)
        for job, end in zip(jobs, ends, strict=True):
            result = job.latest_result()
            assert result is not None and result.exc_string == finish_of(end).exc_string
    finally:
        await queue.close()
        await store.close()
        conn.close()
