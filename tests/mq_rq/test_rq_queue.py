"""RQQueue against a real redis-server and real rq: producers enqueue exactly as
docs/rq.md shows, fnq reserves and completes, and rq's own API reads the end."""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import re
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rq.executions
import rq.registry
import rq.utils
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result

from config.domain import Call, CallStatus, FailureKind, Outcome, Response
from mq import rq_jobs
from mq.base import MessageQueue, QueueStats
from mq.errors import InvalidCall, ReservationLost
from mq.rq import RECEIPTS_KEY, RQQueue

pytestmark = pytest.mark.integration

MakeRQ = Callable[..., RQQueue]


def ok(body: bytes = b"hi", status: int = 200) -> Outcome:
    return Outcome(
        CallStatus.SUCCESS, response=Response(status, {"Content-Type": "text/plain"}, body)
    )


def registries(conn: Redis, name: str = "default") -> dict[str, list[str]]:
    return {
        "started": StartedJobRegistry(name, connection=conn).get_job_ids(),
        "finished": FinishedJobRegistry(name, connection=conn).get_job_ids(),
        "failed": FailedJobRegistry(name, connection=conn).get_job_ids(),
    }


def failure_text(job: Job) -> str:
    result = job.latest_result()
    assert result is not None and result.type == Result.Type.FAILED
    return str(result.exc_string)


class Boom:
    """Unpickling this makes a directory: proof of whether anyone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (str(self.path),))


async def test_is_a_message_queue(make_rq: MakeRQ) -> None:
    assert isinstance(make_rq(), MessageQueue)


async def test_success_finishes_job_with_result(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    job = rq_queue.enqueue(
        "fnq.call", app="demo", fn="echo", body="hello", headers={"Content-Type": "text/plain"}
    )
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    assert (msg.call.id, msg.call.app, msg.call.fn, msg.call.body) == (
        job.id,
        "demo",
        "echo",
        b"hello",
    )
    assert dict(msg.call.headers) == {"Content-Type": "text/plain"}
    assert msg.deliveries == 1
    # STARTED in rq's terms while fnq holds it.
    assert job.get_status() == "started"
    job.refresh()
    assert job.worker_name == queue.worker_name and job.started_at is not None
    assert registries(conn)["started"] == [job.id]
    assert (await queue.stats()).reserved == 1

    await queue.complete(msg, ok(b"HELLO"))

    assert job.get_status() == "finished"
    expected = {"status": 200, "headers": {"Content-Type": "text/plain"}, "body": "HELLO"}
    assert job.return_value(refresh=True) == expected
    latest = job.latest_result()
    assert latest is not None and latest.type == Result.Type.SUCCESSFUL
    assert latest.return_value == expected
    assert registries(conn) == {"started": [], "finished": [job.id], "failed": []}
    assert 0 < conn.ttl(job.key) <= 500  # rq's default result_ttl applies
    stats = await queue.stats()
    assert (stats.ready, stats.reserved, stats.dead, stats.delayed) == (0, 0, 0, 0)


async def test_error_fails_job_with_text(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="x")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    outcome = Outcome(
        CallStatus.TIMEOUT,
        error="function timed out after 30 s",
        failure=FailureKind.FUNCTION,
        response=Response(504, {}, b"too slow"),
    )
    await queue.complete(msg, outcome)
    assert job.get_status() == "failed"
    text = failure_text(job)
    assert "timeout" in text and "function timed out after 30 s" in text and "too slow" in text
    assert registries(conn) == {"started": [], "finished": [], "failed": [job.id]}
    assert (await queue.stats()).dead == 1
    dead = await queue.dead_list()
    assert [d.id for d in dead] == [job.id]
    assert dead[0].call is not None and dead[0].call.app == "demo"
    assert "function timed out" in dead[0].reason


async def test_pickled_job_is_failed_never_unpickled(
    make_rq: MakeRQ, conn: Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    pickled = Queue("default", connection=conn)  # rq's default serializer: pickle
    job = pickled.enqueue("fnq.call", app="demo", fn="echo", body=Boom(marker))
    queue = make_rq()

    assert await queue.reserve(0.2) is None
    assert not marker.exists()
    assert job.get_status() == "failed"
    assert "pickled" in failure_text(job) and "serializer='json'" in failure_text(job)
    assert registries(conn)["failed"] == [job.id]
    assert not marker.exists()
    # The stored payload really had the side effect: unpickling it here makes the marker.
    pickle.loads(zlib.decompress(conn.hget(job.key, "data") or b""))  # the proof
    assert marker.is_dir()


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        (("os.system", "rm -rf /"), {}, "fnq runs only 'fnq.call'"),
        (("fnq.call",), {"app": "demo"}, "needs fn="),
        (("fnq.call",), {"app": "demo", "fn": "echo", "bdy": "x"}, "unknown keyword(s) bdy"),
        (("fnq.call",), {"app": "de mo", "fn": "echo"}, "app 'de mo'"),
        (("fnq.call",), {"app": "demo", "fn": "echo", "headers": {"X": 1}}, "header 'X'"),
        (("fnq.call",), {"app": "demo", "fn": "echo", "body_b64": "!!"}, "not valid base64"),
        (("fnq.call", "demo", "echo"), {"fn": "echo"}, "both by position and by keyword"),
        # lone surrogates (JSON "\udcff"), which rq's JSON serializer writes: no UTF-8 body
        (("fnq.call",), {"app": "demo", "fn": "echo", "body": "a\udcffb"}, "not UTF-8"),
        (("fnq.call",), {"app": "demo", "fn": "echo", "body": {"k": "\udcff"}}, "not UTF-8"),
    ],
)
async def test_bad_jobs_fail_with_reason(
    make_rq: MakeRQ,
    rq_queue: Queue,
    conn: Redis,
    args: tuple[str, ...],
    kwargs: dict[str, object],
    reason: str,
) -> None:
    bad = rq_queue.enqueue(*args, **kwargs)
    good = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None and msg.call.id == good.id  # the bad one never reaches the caller
    assert bad.get_status() == "failed"
    assert reason in failure_text(bad)
    assert registries(conn)["failed"] == [bad.id]
    assert [(b.call_id, reason in b.reason) for b in queue.take_buried()] == [(bad.id, True)]


async def test_job_data_json_cannot_read_fails_the_job(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    """A number of over 4300 digits: json.loads raises ValueError, not JSONDecodeError."""
    bad = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    data = b'["fnq.call", null, [], {"app": "demo", "fn": "echo", "body": %s}]' % (b"1" * 5000)
    conn.hset(bad.key, "data", zlib.compress(data))
    good = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None and msg.call.id == good.id
    assert bad.get_status() == "failed"
    assert "not JSON" in failure_text(bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"timeout", b"abc"),  # AssertionError
        (b"created_at", b"garbage"),
        (b"retry_intervals", b"[bad"),  # JSONDecodeError
        (b"description", b"\xff\xfe"),  # UnicodeDecodeError
    ],
)
async def test_job_rq_cannot_read_is_failed_by_hand(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, field: bytes, value: bytes
) -> None:
    """A job hash that rq's own Job.restore refuses (written by hand, or by an rq that
    stores a field otherwise) is failed without rq's API; the job behind it runs."""
    bad = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    conn.hset(bad.key, field, value)
    good = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None and msg.call.id == good.id
    assert conn.hget(bad.key, "status") == b"failed"
    reason = zlib.decompress(conn.hget(bad.key, "exc_info") or b"").decode()
    assert reason.startswith(f"fnq: rq cannot read job {bad.id}: ")
    assert bad.id in rq_queue.failed_job_registry.get_job_ids()
    assert [b.call_id for b in queue.take_buried()] == [bad.id]
    assert await queue.reserve(0.2) is None  # not delivered again


async def test_positional_json_and_binary_bodies(make_rq: MakeRQ, rq_queue: Queue) -> None:
    rq_queue.enqueue("fnq.call", "demo", "echo", "plain")
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", body={"n": 1, "s": "é"})
    rq_queue.enqueue(
        "fnq.call", app="demo", fn="echo", body_b64=base64.b64encode(b"\xff\x00").decode()
    )
    queue = make_rq()
    msgs = await queue.reserve_many(3, 1.0)
    assert [m.call.body for m in msgs] == [b"plain", '{"n":1,"s":"é"}'.encode(), b"\xff\x00"]
    assert dict(msgs[1].call.headers) == {"Content-Type": "application/json"}
    await queue.complete(msgs[2], ok(b"\xff"))
    value = Job.fetch(msgs[2].call.id, connection=rq_queue.connection, serializer="json")
    assert value.return_value() == {
        "status": 200,
        "headers": {"Content-Type": "text/plain"},
        "body": None,
        "body_b64": "/w==",
    }


async def test_lapse_redelivers_then_fails(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq(mq_reservation_msecs=1000, mq_max_deliveries=2)
    first = await queue.reserve(1.0)
    assert first is not None and first.deliveries == 1
    assert await queue.reserve(0.1) is None  # held
    await asyncio.sleep(1.05)  # the holder "dies": no extend

    second = await queue.reserve(1.0)
    assert second is not None and second.call.id == job.id and second.deliveries == 2
    assert second.receipt != first.receipt
    assert job.get_status() == "started"
    assert [
        e[0] for e in StartedJobRegistry("default", connection=conn).get_job_and_execution_ids()
    ] == [job.id]
    with pytest.raises(ReservationLost):
        await queue.extend(first)

    await asyncio.sleep(1.05)  # lapses again: max deliveries reached
    assert await queue.reserve(0.1) is None
    assert job.get_status() == "failed"
    assert "delivered 2 time(s)" in failure_text(job)
    assert registries(conn) == {"started": [], "finished": [], "failed": [job.id]}
    assert (await queue.stats()).reserved == 0
    [buried] = queue.take_buried()  # once, for the worker to end the call's record
    assert buried.call_id == job.id and "delivered 2 time(s)" in buried.reason
    assert queue.take_buried() == []


async def test_a_late_start_mark_of_a_delivery_handed_back_changes_nothing(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    """A delivery's STARTED mark may reach the server late: its connection timed out on
    a silent network, and the server got it once the network was back, after the
    reservation had lapsed and the job had gone back to its queue. The job stays
    queued (STARTED, it would be skipped there and never run) and is delivered again."""
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    first = await queue.reserve(1.0)
    assert first is not None
    await queue.release(first)  # back on its queue, as a lapse puts it
    restored = rq_jobs.restore_job(conn, job.id, conn.hgetall(job.key))
    late = rq_jobs.mark_started(
        conn,
        restored,
        first.receipt,
        "fnq:late",
        60,
        now_s=conn.time()[0],
        receipts_key=RECEIPTS_KEY,
    )
    assert late is False
    assert job.get_status() == "queued"
    assert registries(conn)["started"] == []
    second = await queue.reserve(1.0)
    assert second is not None and second.call.id == job.id
    assert job.get_status() == "started"


async def test_extend_keeps_reservation(make_rq: MakeRQ, rq_queue: Queue) -> None:
    rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq(mq_reservation_msecs=1000)
    msg = await queue.reserve(1.0)
    assert msg is not None
    for _ in range(3):
        await asyncio.sleep(0.5)
        await queue.extend(msg)
        assert await queue.reserve(0.01) is None
    await queue.complete(msg, ok())


async def test_a_job_taken_on_a_host_ten_minutes_behind_is_not_abandoned_by_rqs_cleanup(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rq counts the started registries' expiries from the clock of the host that
    writes them, and its cleanup (run by ``rq info``, by any count of the registry)
    from its own: fnq writes them by Redis's clock, as its extends do."""
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    behind = rq.utils.current_timestamp
    with monkeypatch.context() as host:  # rq's reads of this host's clock, 600 s behind
        host.setattr(rq.registry, "current_timestamp", lambda: behind() - 600)
        host.setattr(rq.executions, "current_timestamp", lambda: behind() - 600)
        msg = await queue.reserve(1.0)
    assert msg is not None and msg.call.id == job.id
    StartedJobRegistry("default", connection=conn).cleanup()  # by a clock that is right
    assert job.get_status(refresh=True) == "started"
    await queue.complete(msg, ok())
    assert job.get_status(refresh=True) == "finished"


async def test_release_and_delayed_release(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    await queue.release(msg)
    assert job.get_status() == "queued" and rq_queue.job_ids == [job.id]
    assert registries(conn)["started"] == []

    again = await queue.reserve(1.0)
    assert again is not None and again.deliveries == 1  # a release charges nothing
    await queue.release(again, delay_s=0.3)
    assert job.get_status() == "scheduled"
    assert ScheduledJobRegistry("default", connection=conn).get_job_ids() == [job.id]
    stats = await queue.stats()
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 1, 0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    later = await queue.reserve(3.0)
    assert later is not None and later.call.id == job.id
    assert 0.2 <= loop.time() - start < 1.5


async def test_ack_drops_reservation_only(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    await queue.ack(msg)
    assert (await queue.stats()).reserved == 0
    assert registries(conn)["started"] == []
    with pytest.raises(ReservationLost):
        await queue.extend(msg)
    assert job.get_status() == "started"  # documented: ack leaves rq's status alone


async def test_dead_letter_requeue_purge(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    await queue.dead_letter(msg, "function demo/echo is not registered")
    assert job.get_status() == "failed"
    assert "function demo/echo is not registered" in failure_text(job)
    assert await queue.dead_among(["nope", job.id]) == [job.id]
    assert await queue.dead_requeue() == 1
    assert job.get_status() == "queued"
    back = await queue.reserve(1.0)
    assert back is not None and back.deliveries == 1
    await queue.dead_letter(back, "again")
    assert await queue.dead_purge([job.id]) == 1
    assert not conn.exists(job.key)
    assert (await queue.stats()).dead == 0


async def test_reserve_wakes_on_enqueue(make_rq: MakeRQ, rq_queue: Queue) -> None:
    queue = make_rq(("high", "default"))
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiting = asyncio.create_task(queue.reserve(5.0))
    await asyncio.sleep(0.2)
    job = await asyncio.to_thread(rq_queue.enqueue, "fnq.call", app="demo", fn="echo")
    msg = await waiting
    assert msg is not None and msg.call.id == job.id
    assert loop.time() - start < 1.0


async def test_queues_taken_in_order(make_rq: MakeRQ, rq_queue: Queue, conn: Redis) -> None:
    high = Queue("high", connection=conn, serializer="json")
    low = rq_queue.enqueue("fnq.call", app="demo", fn="low")
    first = high.enqueue("fnq.call", app="demo", fn="high")
    queue = make_rq(("high", "default"))
    msgs = await queue.reserve_many(2, 1.0)
    assert [m.call.id for m in msgs] == [first.id, low.id]


async def test_late_complete_keeps_first_end(make_rq: MakeRQ, rq_queue: Queue) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq(mq_reservation_msecs=1000)
    slow = await queue.reserve(1.0)
    assert slow is not None
    await asyncio.sleep(1.05)
    fast = await queue.reserve(1.0)
    assert fast is not None and fast.deliveries == 2
    await queue.complete(fast, ok(b"fast"))
    await queue.complete(slow, Outcome(CallStatus.ERROR, error="late"))
    assert job.get_status() == "finished"
    assert job.return_value(refresh=True)["body"] == "fast"  # type: ignore[index]
    assert len(job.results()) == 1


async def test_push_round_trip(make_rq: MakeRQ, conn: Redis) -> None:
    from config.domain import Call, new_call_id  # noqa: PLC0415

    queue = make_rq()
    call = Call(new_call_id(), "demo", "echo", b"\x00bin", {"X-A": "1"})
    assert await queue.push(call) == call.id
    assert await queue.push(call) == call.id  # one job per id while it is live
    assert (await queue.stats()).ready == 1
    msg = await queue.reserve(1.0)
    assert msg is not None
    assert (msg.call.id, msg.call.body, dict(msg.call.headers)) == (
        call.id,
        b"\x00bin",
        {"X-A": "1"},
    )


@pytest.mark.parametrize(
    ("call", "options", "reason"),
    [
        (Call("rq-app", "de mo", "echo"), {}, "app 'de mo'"),
        (Call("rq-prio", "demo", "echo"), {"priority": 7}, "priority 7"),
        (Call("rq-delay", "demo", "echo"), {"delay_s": -5.0}, "delay -5.0"),
        (Call("rq-big", "demo", "echo", b"x" * 1_048_577), {}, "exceeds the limit"),
        (Call("order.1", "demo", "echo"), {}, "Job ID"),  # an fnq id, not an rq one
    ],
)
async def test_push_of_a_call_that_would_only_fail_raises_invalid_call(
    make_rq: MakeRQ, conn: Redis, call: Call, options: dict[str, Any], reason: str
) -> None:
    queue = make_rq()
    with pytest.raises(InvalidCall, match=re.escape(reason)):
        await queue.push_new(call, **options)
    assert not conn.exists(Job.key_for(call.id))


async def test_push_new_reports_whether_it_queued_a_job(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    queue = make_rq()
    second = Call("rq-dup", "demo", "echo", b"second")
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="first", job_id="rq-dup")
    assert await queue.push_new(second) is False  # queued by an rq producer: it stays
    assert await queue.push_new(second, delay_s=30) is False
    msg = await queue.reserve(1.0)
    assert msg is not None and msg.call.body == b"first"
    assert await queue.push_new(second) is False  # started
    await queue.ack(msg)
    assert await queue.push_new(second) is False  # ack leaves the job started in rq
    await queue.complete(msg, ok())
    assert await queue.push_new(second) is True  # finished: queued again, as new
    again = await queue.reserve(1.0)
    assert again is not None and (again.call.body, again.deliveries) == (b"second", 1)
    await queue.dead_letter(again, "gave up")
    assert await queue.push_new(second) is True  # failed: queued again too
    assert rq_queue.job_ids == ["rq-dup"]


async def test_push_new_sees_a_scheduled_job(make_rq: MakeRQ, conn: Redis) -> None:
    queue = make_rq()
    assert await queue.push_new(Call("rq-later", "demo", "echo", b"later"), delay_s=30) is True
    assert Job.fetch("rq-later", connection=conn).get_status() == "scheduled"
    assert await queue.push_new(Call("rq-later", "demo", "echo", b"now")) is False
    stats = await queue.stats()
    assert (stats.ready, stats.delayed) == (0, 1)


async def test_of_two_pushes_of_one_id_at_once_one_queues(make_rq: MakeRQ, rq_queue: Queue) -> None:
    for n in range(5):
        calls = [Call(f"rq-race-{n}", "demo", "echo", b"%d" % i) for i in range(2)]
        queued = await asyncio.gather(*(make_rq().push_new(c) for c in calls))
        assert sorted(queued) == [False, True]
    assert rq_queue.job_ids == [f"rq-race-{n}" for n in range(5)]


async def test_mixed_run_registries_and_rq_info(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, rq_url: str
) -> None:
    rq_queue.enqueue("os.system", "true")
    Queue("default", connection=conn).enqueue("fnq.call", app="demo", fn="echo")
    good = [rq_queue.enqueue("fnq.call", app="demo", fn="echo", body=str(i)) for i in range(6)]
    queue = make_rq()
    msgs = await queue.reserve_many(6, 1.0)  # the two bad jobs take places: up to 6
    msgs += await queue.reserve_many(6 - len(msgs), 1.0)
    assert sorted(m.call.id for m in msgs) == sorted(j.id for j in good)
    for i, msg in enumerate(msgs[:5]):
        await queue.complete(msg, ok() if i % 2 == 0 else Outcome(CallStatus.ERROR, error="e"))
    held = registries(conn)
    assert (len(held["started"]), len(held["finished"]), len(held["failed"])) == (1, 3, 4)
    assert rq_info(rq_url) == "queue default 0, 1 executing, 3 finished, 4 failed"
    await queue.complete(msgs[5], ok())
    stats = await queue.stats()
    assert (stats.ready, stats.reserved, stats.dead, stats.delayed) == (0, 0, 4, 0)
    assert rq_info(rq_url) == "queue default 0, 0 executing, 4 finished, 4 failed"


def rq_info(url: str) -> str:
    """rq's own monitor (`rq info --raw`), as an operator would run it."""
    rq_cli = Path(sys.executable).with_name("rq")
    out = subprocess.run(
        [str(rq_cli), "info", "-u", url, "--only-queues", "--raw", "default"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.strip().splitlines()[0]


async def test_enqueue_in_runs_without_rq_scheduler(make_rq: MakeRQ, rq_queue: Queue) -> None:
    from datetime import timedelta  # noqa: PLC0415

    job = rq_queue.enqueue_in(timedelta(seconds=1), "fnq.call", app="demo", fn="echo")
    queue = make_rq()
    assert job.get_status() == "scheduled"
    msg = await queue.reserve(3.0)
    assert msg is not None and msg.call.id == job.id
    assert job.get_status() == "started"


async def test_a_job_scheduled_while_a_reserve_waits_starts_near_its_time(
    make_rq: MakeRQ, rq_queue: Queue
) -> None:
    from datetime import timedelta  # noqa: PLC0415

    from mq.rq import SCHEDULED_POLL_S  # noqa: PLC0415

    queue = make_rq()
    assert await queue.reserve(0.05) is None  # nothing scheduled: the wait has no end of its own
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(queue.reserve(20.0))
    await asyncio.sleep(0.3)
    start = loop.time()
    job = await asyncio.to_thread(
        rq_queue.enqueue_in, timedelta(seconds=0.5), "fnq.call", app="demo", fn="echo"
    )
    msg = await asyncio.wait_for(waiting, 20.0)
    assert msg is not None and msg.call.id == job.id
    assert loop.time() - start < 0.5 + SCHEDULED_POLL_S + 0.5


@pytest.mark.parametrize("delay_s", [0.0, 30.0])
async def test_release_of_a_job_canceled_meanwhile_keeps_it_canceled(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, delay_s: float
) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq()
    msg = await queue.reserve(1.0)
    assert msg is not None
    job.cancel()  # rq's side, while fnq holds it
    await queue.release(msg, delay_s=delay_s)
    assert job.get_status() == "canceled"
    assert rq_queue.job_ids == []
    assert ScheduledJobRegistry("default", connection=conn).get_job_ids() == []
    stats = await queue.stats()
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, 0)
    assert await queue.reserve(0.1) is None


@pytest.mark.parametrize("then", ["ack", "release", "extend", "lapse"])
async def test_a_job_deleted_while_held_and_enqueued_again_is_a_new_job(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, then: str
) -> None:
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="old", job_id="again")
    queue = make_rq(mq_reservation_msecs=1000)
    old = await queue.reserve(1.0)
    assert old is not None
    Job.fetch("again", connection=conn, serializer="json").delete()
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="new", job_id="again")
    if then == "ack":
        await queue.ack(old)
    elif then == "release":
        await queue.release(old)
    elif then == "extend":
        with pytest.raises(ReservationLost):
            await queue.extend(old)
    else:
        await asyncio.sleep(1.05)
    assert rq_queue.job_ids == ["again"]  # once
    new = await queue.reserve(1.0)  # the old reservation does not hide it
    assert new is not None and (new.call.body, new.deliveries) == (b"new", 1)
    assert Job.fetch("again", connection=conn).get_status() == "started"
    assert rq_queue.job_ids == []  # not queued twice by the old reservation's lapse
    assert (await queue.stats()).reserved == 1
    await queue.ack(old)  # the old delivery leaves the new one alone
    with pytest.raises(ReservationLost):
        await queue.extend(old)
    await queue.extend(new)
    assert (await queue.stats()).reserved == 1


async def test_an_old_reservation_of_a_new_job_goes_when_it_is_handed_out(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", job_id="again")
    queue = make_rq()
    old = await queue.reserve(1.0)
    assert old is not None
    Job.fetch("again", connection=conn, serializer="json").delete()
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", job_id="again")
    new = await queue.reserve(1.0)
    assert new is not None and new.receipt != old.receipt
    with pytest.raises(ReservationLost):
        await queue.extend(old)
    await queue.release(old)  # a no-op: the new job stays held
    assert rq_queue.job_ids == [] and (await queue.stats()).reserved == 1


async def test_push_new_of_a_job_canceled_while_held_is_handed_out(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", job_id="redo")
    queue = make_rq()
    old = await queue.reserve(1.0)
    assert old is not None
    Job.fetch("redo", connection=conn, serializer="json").cancel()
    assert await queue.push_new(Call("redo", "demo", "echo", b"again")) is True
    new = await queue.reserve(1.0)
    assert new is not None and (new.call.body, new.deliveries) == (b"again", 1)
    await queue.release(old)  # the old delivery leaves the new one alone
    assert rq_queue.job_ids == [] and (await queue.stats()).reserved == 1


@pytest.mark.parametrize("end", ["complete", "dead_letter"])
async def test_an_old_delivery_does_not_end_a_new_job_of_its_id(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis, end: str
) -> None:
    rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="old", job_id="again")
    queue = make_rq()
    old = await queue.reserve(1.0)
    assert old is not None
    Job.fetch("again", connection=conn, serializer="json").delete()
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo", body="new", job_id="again")
    if end == "complete":
        await queue.complete(old, ok(b"old"))
    else:
        await queue.dead_letter(old, "gave up")
    assert job.get_status() == "queued" and rq_queue.job_ids == ["again"]
    assert job.latest_result() is None
    new = await queue.reserve(1.0)
    assert new is not None and new.call.body == b"new"
    await queue.complete(new, ok(b"new"))
    assert job.get_status() == "finished"
    assert job.return_value(refresh=True)["body"] == "new"  # type: ignore[index]


@pytest.mark.parametrize("end", ["finished", "failed", "canceled"])
async def test_push_new_of_an_ended_job_leaves_no_trace_of_its_end(
    make_rq: MakeRQ, conn: Redis, end: str
) -> None:
    queue = make_rq()
    assert await queue.push_new(Call("redo", "demo", "echo", b"first"))
    msg = await queue.reserve(1.0)
    assert msg is not None
    if end == "canceled":
        Job.fetch("redo", connection=conn, serializer="json").cancel()
        await queue.ack(msg)
    elif end == "failed":
        await queue.dead_letter(msg, "gave up")
    else:
        await queue.complete(msg, ok())
    assert await queue.push_new(Call("redo", "demo", "echo", b"second"))
    job = Job.fetch("redo", connection=conn, serializer="json")
    assert job.get_status() == "queued" and job.latest_result() is None
    assert registries(conn) == {"started": [], "finished": [], "failed": []}
    assert CanceledJobRegistry("default", connection=conn).get_job_ids() == []
    assert await queue.dead_list() == []
    assert await queue.stats() == QueueStats(ready=1, delayed=0, reserved=0, dead=0)
    assert await queue.dead_purge() == 0 and conn.exists(job.key)


async def test_a_job_claimed_before_receipts_were_kept_lapses_and_comes_back(
    make_rq: MakeRQ, rq_queue: Queue, conn: Redis
) -> None:
    job = rq_queue.enqueue("fnq.call", app="demo", fn="echo")
    queue = make_rq(mq_reservation_msecs=1000, mq_max_deliveries=3)
    first = await queue.reserve(1.0)
    assert first is not None and first.deliveries == 1
    conn.hdel(f"rq:job:{job.id}", "fnq_receipt")  # as an older fnq left its claim
    await asyncio.sleep(1.05)  # the holder is gone: the reservation lapses
    second = await queue.reserve(1.0)
    assert second is not None and second.call.id == job.id and second.deliveries == 2
    await queue.complete(second, ok())
    assert job.get_status() == "finished"
