"""The Datastore contract, run against every backend with a real database."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from config.domain import (
    Call,
    CallStatus,
    FailureKind,
    Function,
    Outcome,
    Response,
    new_call_id,
    utcnow,
)
from datastore import reading
from datastore.base import CallFilter, encode_cursor
from datastore.common import SqlDatastore
from datastore.errors import (
    FunctionExists,
    FunctionNotFound,
    InvalidCursor,
    InvalidFunction,
    StoreError,
)
from tests.datastore.conftest import MakeStore

pytestmark = pytest.mark.integration


def call(app: str = "shop", fn: str = "resize") -> Call:
    return Call(id=new_call_id(), app=app, fn=fn, body=b"{}")


def success(body: bytes = b"ok", log: bytes = b"hello\n") -> Outcome:
    now = utcnow()
    return Outcome(
        CallStatus.SUCCESS,
        response=Response(200, {"Content-Type": "text/plain"}, body),
        log=log,
        container_id="c-1",
        started_at=now,
        completed_at=now,
        stats={"cpu_ms": 3.5},
    )


def failed(error: str = "The function exited with code 1.") -> Outcome:
    return Outcome(CallStatus.ERROR, error=error, failure=FailureKind.FUNCTION, log=b"boom\n")


# ------------------------------------------------------------------ registry


async def test_registry_crud(store: SqlDatastore) -> None:
    fn = Function("shop", "resize", "shop/resize:1.2", memory_mb=256, config={"MODE": "fast"})
    created = await store.create_fn(fn)
    assert created.created_at is not None
    assert created.updated_at == created.created_at
    got = await store.get_fn("shop", "resize")
    assert got == created
    assert dict(got.config) == {"MODE": "fast"}

    with pytest.raises(FunctionExists):
        await store.create_fn(fn)

    updated = await store.update_fn("shop", "resize", timeout_s=120, config={"MODE": "slow"})
    assert (updated.timeout_s, dict(updated.config)) == (120, {"MODE": "slow"})
    assert updated.created_at == created.created_at
    assert updated.updated_at is not None and updated.updated_at >= created.created_at
    assert await store.get_fn("shop", "resize") == updated

    await store.create_fn(Function("shop", "crop", "crop:1"))
    await store.create_fn(Function("blog", "render", "render:1"))
    assert [f.ref for f in await store.list_fns()] == ["blog/render", "shop/crop", "shop/resize"]
    assert [f.name for f in await store.list_fns("shop")] == ["crop", "resize"]

    assert await store.delete_fn("shop", "crop") is True
    assert await store.delete_fn("shop", "crop") is False
    assert await store.get_fn("shop", "crop") is None


async def test_several_functions_are_read_at_once(store: SqlDatastore) -> None:
    keys = [("shop", "resize"), ("shop", "crop"), ("blog", "resize")]
    made = [await store.create_fn(Function(app, name, f"{name}:1")) for app, name in keys]
    asked = [("shop", "resize"), ("blog", "resize"), ("blog", "crop"), ("shop", "resize")]
    assert await store.get_fns(asked) == {("shop", "resize"): made[0], ("blog", "resize"): made[2]}
    assert await store.get_fns([]) == {}
    assert await store.get_fns([("nope", "nothing")]) == {}


async def test_registry_validation(store: SqlDatastore) -> None:
    with pytest.raises(InvalidFunction, match="memory must be between 6 and 8192 MB"):
        await store.create_fn(Function("a", "f", "img:1", memory_mb=9000))
    with pytest.raises(InvalidFunction, match="not a valid image reference"):
        await store.create_fn(Function("a", "f", "Bad Image!"))
    with pytest.raises(FunctionNotFound, match="no function a/missing"):
        await store.update_fn("a", "missing", memory_mb=64)
    await store.create_fn(Function("a", "f", "img:1"))
    with pytest.raises(InvalidFunction, match="timeout must be between 1 and 3600"):
        await store.update_fn("a", "f", timeout_s=0)
    with pytest.raises(InvalidFunction, match="cannot change colour, created_at"):
        await store.update_fn("a", "f", colour="blue", created_at=utcnow())
    assert (await store.get_fn("a", "f")) is not None
    assert await store.list_fns("nobody") == []


# ----------------------------------------------------------------- lifecycle


async def test_a_delayed_call_is_queued_with_when_it_may_start(store: SqlDatastore) -> None:
    delayed = dataclasses.replace(call(), delay_s=30.0)
    before = utcnow()
    await store.record_queued(delayed)
    rec = await store.get_call(delayed.id)
    assert rec is not None and rec.next_try_at is not None
    wait_s = (rec.next_try_at - before).total_seconds()
    assert 29.9 <= wait_s <= 31, wait_s
    running = await store.record_running(delayed, attempt=1, worker_id="host:1")
    assert running.next_try_at is None  # it started: nothing is due any more

    at_once = call()
    await store.record_queued(at_once)
    rec = await store.get_call(at_once.id)
    assert rec is not None and rec.next_try_at is None


async def test_lifecycle_from_queued_to_success(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c, image="shop/resize:1")
    await store.record_queued(c, image="other:2")  # idempotent: the first insert stays
    rec = await store.get_call(c.id)
    assert rec is not None
    assert (rec.status, rec.image, rec.attempts) == (CallStatus.QUEUED, "shop/resize:1", 0)
    assert rec.created_at == c.created_at.replace(microsecond=rec.created_at.microsecond)

    running = await store.record_running(c, attempt=1, worker_id="host:1")
    assert (running.status, running.attempts, running.worker_id) == (
        CallStatus.RUNNING,
        1,
        "host:1",
    )
    assert running.started_at is not None

    assert await store.record_outcome(c, success(b"done", b"line 1\n"), 1, "host:1") is True
    rec = await store.get_call(c.id)
    assert rec is not None
    assert rec.status is CallStatus.SUCCESS
    assert rec.completed_at is not None and rec.error is None
    assert (rec.response_status, rec.response_body) == (200, b"done")
    assert dict(rec.response_headers) == {"Content-Type": "text/plain"}
    assert dict(rec.stats) == {"cpu_ms": 3.5}
    assert rec.container_id == "c-1" and rec.image == "shop/resize:1"
    assert await store.get_log(c.id) == b"line 1\n"  # the response is not in the log

    doc = rec.to_json()
    assert doc["response"]["body"] == "done" and doc["status"] == "success"


async def test_get_calls_reads_several_records_at_once(store: SqlDatastore) -> None:
    queued, done, absent = call(), call(), call()
    await store.record_queued(queued)
    assert await store.record_outcome(done, success(b"ok", b""), 1, "host:1")
    found = await store.get_calls([queued.id, absent.id, done.id])
    assert set(found) == {queued.id, done.id}
    assert found[queued.id].status is CallStatus.QUEUED
    assert found[done.id] == await store.get_call(done.id)
    assert await store.get_calls([]) == {}
    assert await store.get_calls([absent.id]) == {}


async def test_running_creates_record_first_seen_by_worker(store: SqlDatastore) -> None:
    c = call()
    rec = await store.record_running(c, attempt=1, worker_id="w")
    assert rec.status is CallStatus.RUNNING and rec.app == "shop"
    await store.record_queued(c)  # a late producer write does not move it back
    got = await store.get_call(c.id)
    assert got is not None and got.status is CallStatus.RUNNING


async def test_running_with_attempt_zero_counts_attempts(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c)
    first = await store.record_running(c, attempt=0, worker_id="w1")
    assert first.attempts == 1
    # A redelivery (the first worker died) is the next attempt.
    second = await store.record_running(c, attempt=0, worker_id="w2")
    assert (second.attempts, second.worker_id) == (2, "w2")
    explicit = await store.record_running(c, attempt=7, worker_id="w3")
    assert explicit.attempts == 7


async def test_outcome_without_earlier_records(store: SqlDatastore) -> None:
    c = call()
    assert await store.record_outcome(c, failed(), 1, "w") is True
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.ERROR
    assert rec.error == "The function exited with code 1."
    assert rec.failure is FailureKind.FUNCTION


async def test_final_state_is_idempotent_and_never_overwritten(store: SqlDatastore) -> None:
    c = call()
    await store.record_running(c, 1, "w1")
    first = success(b"first", b"first log")
    assert await store.record_outcome(c, first, 1, "w1") is True
    assert await store.record_outcome(c, first, 1, "w1") is False  # same outcome again
    # a duplicate delivery that ran again elsewhere
    assert await store.record_outcome(c, failed("The function crashed."), 2, "w2") is False
    again = await store.record_running(c, 2, "w2")
    assert again.status is CallStatus.SUCCESS and again.worker_id == "w1"
    await store.record_retry(c, failed(), 2, utcnow())
    rec = await store.get_call(c.id)
    assert rec is not None
    assert (rec.status, rec.response_body, rec.attempts) == (CallStatus.SUCCESS, b"first", 1)
    assert await store.get_log(c.id) == b"first log"
    page = await store.list_calls(CallFilter())
    assert [r.id for r in page.items] == [c.id]


async def test_concurrent_duplicate_outcomes_leave_one_winner(store: SqlDatastore) -> None:
    c = call()
    outcomes = [success(f"body {i}".encode()) for i in range(20)]
    won = await asyncio.gather(
        *(store.record_outcome(c, o, 1, f"w{i}") for i, o in enumerate(outcomes))
    )
    assert sum(won) == 1
    rec = await store.get_call(c.id)
    assert rec is not None
    assert rec.response_body == f"body {won.index(True)}".encode()


async def test_retry_goes_back_to_queued_and_keeps_error(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c)
    await store.record_running(c, 1, "w")
    next_try = utcnow() + timedelta(seconds=4)
    await store.record_retry(c, failed("The function timed out after 30 s."), 1, next_try)
    rec = await store.get_call(c.id)
    assert rec is not None
    assert (rec.status, rec.attempts) == (CallStatus.QUEUED, 1)
    assert rec.error == "The function timed out after 30 s."
    assert rec.next_try_at is not None and abs(rec.next_try_at - next_try) < timedelta(seconds=1)
    assert rec.completed_at is None
    rec2 = await store.record_running(c, 2, "w")
    assert (rec2.status, rec2.attempts, rec2.next_try_at) == (CallStatus.RUNNING, 2, None)
    assert rec2.error is None  # the error was the last attempt's, not this one's
    assert await store.record_outcome(c, success(), 2, "w")
    done = await store.get_call(c.id)
    assert done is not None and done.status is CallStatus.SUCCESS and done.error is None


async def test_default_error_sentences(store: SqlDatastore) -> None:
    c = call()
    await store.record_outcome(c, Outcome(CallStatus.TIMEOUT), 1, "w")
    rec = await store.get_call(c.id)
    assert rec is not None and rec.error == "The call ran past its function's timeout."


async def test_bounds_on_log_and_response(make_store: MakeStore) -> None:
    store = await make_store(max_log_size_bytes=1000, max_response_size=10)
    c = call()
    outcome = dataclasses.replace(success(b"x" * 50, b"y" * 5000))
    await store.record_outcome(c, outcome, 1, "w")
    rec = await store.get_call(c.id)
    assert rec is not None
    assert rec.response_body == b"x" * 10 and rec.response_truncated
    assert rec.log_truncated
    log = await store.get_log(c.id)
    assert log is not None
    assert log.startswith(b"y" * 1000) and log.count(b"truncated") == 1
    assert len(log) < 1000 + 128
    # a log the agent already cut (limit plus its marker) is kept as it came
    c2 = call()
    agent_cut = b"z" * 1000 + b"\n-- log cut at 1000 bytes --\n"
    await store.record_outcome(c2, success(log=agent_cut), 1, "w")
    assert await store.get_log(c2.id) == agent_cut


async def test_binary_response_is_base64_in_json(store: SqlDatastore) -> None:
    c = call()
    await store.record_outcome(c, success(b"\xff\xfe\x00"), 1, "w")
    rec = await store.get_call(c.id)
    assert rec is not None
    assert rec.to_json()["response"] == {
        "status": 200,
        "headers": {"Content-Type": "text/plain"},
        "body": "//4A",
        "body_encoding": "base64",
        "truncated": False,
    }


# ---------------------------------------------------------------- cancelling


async def test_cancel_queued_is_final(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c)
    rec = await store.request_cancel(c.id)
    assert rec is not None and rec.status is CallStatus.CANCELLED and rec.completed_at
    assert rec.error and "cancelled" in rec.error
    after = await store.record_running(c, 1, "w")  # the worker then acks without running
    assert after.status is CallStatus.CANCELLED
    assert await store.request_cancel(new_call_id()) is None


async def test_cancel_running_sets_flag_and_stops_retries(store: SqlDatastore) -> None:
    c = call()
    await store.record_running(c, 1, "w")
    rec = await store.request_cancel(c.id)
    assert rec is not None and rec.status is CallStatus.RUNNING and rec.cancel_requested
    await store.record_retry(c, failed(), 1, utcnow())
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.CANCELLED and rec.completed_at


async def test_a_buried_call_ends_as_an_error_unless_it_moved_on(store: SqlDatastore) -> None:
    queued, running, done, later = call(), call(), call(), call()
    await store.record_queued(queued)
    await store.record_running(running, 2, "w")
    await store.record_outcome(done, success(), 1, "w")
    await store.record_running(later, 1, "w")
    died_at = utcnow()
    await asyncio.sleep(0.01)  # times are stored to the microsecond: "since" is later
    await store.record_running(later, 2, "w2")  # requeued and taken again since
    reason = "delivered 3 time(s); the reservation lapsed each time\x00"
    for c in (queued, running):
        assert await store.end_buried(c.id, reason, died_at)
        rec = await store.get_call(c.id)
        assert rec is not None and rec.status is CallStatus.ERROR
        assert rec.failure is FailureKind.TERMINAL
        assert rec.error == reason.replace("\x00", "\ufffd")
        assert rec.completed_at is not None and rec.next_try_at is None
    assert not await store.end_buried(running.id, "again", utcnow())  # final now
    assert not await store.end_buried(done.id, reason, utcnow())
    assert (await store.get_call(done.id)).status is CallStatus.SUCCESS  # type: ignore[union-attr]
    assert not await store.end_buried(later.id, reason, died_at)
    assert (await store.get_call(later.id)).status is CallStatus.RUNNING  # type: ignore[union-attr]
    unknown = new_call_id()
    assert not await store.end_buried(unknown, reason, utcnow())
    assert await store.get_call(unknown) is None


def not_started(failure: FailureKind, status: CallStatus = CallStatus.ERROR) -> Outcome:
    """An attempt that never reached a container (no room, cancelled while it waited)."""
    return Outcome(status, error="never started", failure=failure, completed_at=utcnow())


async def test_a_call_that_never_ran_has_no_run_time(store: SqlDatastore) -> None:
    # Marked `running` as a worker took it, then handed back unstarted (no room):
    # the mark's time goes with it, so a cancel while queued leaves no run time.
    released = call()
    await store.record_queued(released)
    await store.record_running(released, 0, "w")
    await store.record_retry(released, not_started(FailureKind.BUSY), 0, utcnow())
    back = await store.get_call(released.id)
    assert back is not None and (back.status, back.started_at) == (CallStatus.QUEUED, None)
    cancelled = await store.request_cancel(released.id)
    assert cancelled is not None and cancelled.status is CallStatus.CANCELLED
    assert (cancelled.started_at, cancelled.attempts) == (None, 0)
    # Cancelled while it waited for a container: it ends without ever starting.
    waited = call()
    await store.record_running(waited, 0, "w")
    await store.record_outcome(waited, not_started(FailureKind.CANCELLED, CallStatus.CANCELLED),
                               1, "w")  # fmt: skip
    rec = await store.get_call(waited.id)
    assert rec is not None and rec.status is CallStatus.CANCELLED and rec.started_at is None


async def test_a_call_cancelled_between_attempts_has_no_run_time(store: SqlDatastore) -> None:
    c = call()
    await store.record_running(c, 0, "w")
    ran = dataclasses.replace(failed(), started_at=utcnow(), completed_at=utcnow())
    await store.record_retry(c, ran, 1, utcnow() + timedelta(seconds=30))
    queued = await store.get_call(c.id)
    assert queued is not None and queued.started_at is not None  # the failed run's start
    # That run is over; from its start to the cancel would count the backoff as run time.
    rec = await store.request_cancel(c.id)
    assert rec is not None and rec.status is CallStatus.CANCELLED
    assert (rec.started_at, rec.attempts) == (None, 1) and rec.completed_at is not None


HANDED_BACK = not_started(FailureKind.BUSY)


async def test_a_worker_puts_back_only_its_own_running_record(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c)
    assert (await store.record_running(c, 0, "w1")).attempts == 1
    assert not await store.record_retry(c, HANDED_BACK, 0, utcnow(), running_on="w2")
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.worker_id, rec.attempts) == (
        CallStatus.RUNNING, "w1", 1)  # fmt: skip
    assert await store.record_retry(c, HANDED_BACK, 0, utcnow(), running_on="w1")
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.attempts, rec.started_at, rec.error) == (
        CallStatus.QUEUED, 0, None, "never started")  # fmt: skip
    # Queued again, then taken by another worker, then ended: each time w1's write,
    # however late it comes, changes nothing.
    assert not await store.record_retry(c, HANDED_BACK, 0, utcnow(), running_on="w1")
    await store.record_running(c, 0, "w2")
    assert not await store.record_retry(c, HANDED_BACK, 0, utcnow(), running_on="w1")
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.worker_id) == (CallStatus.RUNNING, "w2")
    assert await store.record_outcome(c, success(), 1, "w2")
    assert not await store.record_retry(c, HANDED_BACK, 0, utcnow(), running_on="w2")
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.attempts) == (CallStatus.SUCCESS, 1)


@pytest.mark.parametrize("logs", ["table", "files"])
async def test_an_attempt_that_never_started_leaves_the_log_of_the_last_run(
    make_store: MakeStore, tmp_path_factory: pytest.TempPathFactory, logs: str
) -> None:
    log_url = f"file://{tmp_path_factory.mktemp('logs')}" if logs == "files" else ""
    store = await make_store(log_url=log_url)
    c = call()
    await store.record_running(c, 0, "w1")
    now = utcnow()
    ran = Outcome(CallStatus.ERROR, "crashed", FailureKind.FUNCTION, log=b"first run\n",
                  started_at=now, completed_at=now)  # fmt: skip
    assert await store.record_retry(c, ran, 1, now)
    await store.record_running(c, 0, "w1")
    assert await store.record_retry(c, HANDED_BACK, 1, utcnow(), running_on="w1")
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.attempts) == (CallStatus.QUEUED, 1)
    assert await store.get_log(c.id) == b"first run\n"
    await store.record_running(c, 0, "w2")  # moved on: w1's late write is refused
    assert not await store.record_retry(c, HANDED_BACK, 1, utcnow(), running_on="w1")
    assert await store.get_log(c.id) == b"first run\n"


async def test_the_outcome_records_the_image_that_ran(store: SqlDatastore) -> None:
    unqueued, queued, early = call(), call(), call()  # pushed by redis-cli: no queued record
    await store.record_queued(queued, "shop/resize:1")
    await store.record_queued(early, "shop/resize:1")
    ran = dataclasses.replace(success(), image="shop/resize:2")
    await store.record_outcome(unqueued, ran, 1, "w")
    await store.record_outcome(queued, ran, 1, "w")
    await store.record_outcome(early, failed(), 1, "w")  # never ran: no image of its own
    images = [(await store.get_call(c.id)).image for c in (unqueued, queued, early)]  # type: ignore[union-attr]
    assert images == ["shop/resize:2", "shop/resize:2", "shop/resize:1"]


# ------------------------------------------------------------ listing/counts


async def test_list_filters_and_counts(store: SqlDatastore) -> None:
    a = [call("shop", "resize") for _ in range(3)]
    b = [call("shop", "crop") for _ in range(2)]
    for c in a + b:
        await store.record_queued(c)
    await store.record_outcome(a[0], success(), 1, "w")
    await store.record_outcome(b[0], failed(), 1, "w")

    page = await store.list_calls(CallFilter(app="shop", fn="resize"))
    assert [r.id for r in page.items] == [c.id for c in reversed(a)]
    assert page.next_cursor is None
    errors = await store.list_calls(CallFilter(status=CallStatus.ERROR))
    assert [r.id for r in errors.items] == [b[0].id]
    late = await store.list_calls(CallFilter(since=utcnow() + timedelta(minutes=1)))
    assert late.items == []

    counts = await store.count_by_status()
    assert counts[CallStatus.QUEUED] == 3 and counts[CallStatus.SUCCESS] == 1
    assert counts[CallStatus.ERROR] == 1 and counts[CallStatus.RUNNING] == 0
    assert (await store.count_by_status("shop", "crop"))[CallStatus.QUEUED] == 1

    with pytest.raises(InvalidCursor):
        await store.list_calls(CallFilter(cursor="!!not-a-cursor"))


async def test_counts_by_status_stop_past_at_most(store: SqlDatastore) -> None:
    made = [call("shop") for _ in range(5)] + [call("blog") for _ in range(2)]
    for c in made:
        await store.record_queued(c)
    for c in made[4:]:
        await store.record_outcome(c, success(), 1, "w")
    counts = await store.count_by_status(at_most=3)
    assert (counts[CallStatus.QUEUED], counts[CallStatus.SUCCESS]) == (4, 3)  # 4: "more than 3"
    assert counts[CallStatus.ERROR] == 0
    shop = await store.count_by_status("shop", at_most=3)
    assert (shop[CallStatus.QUEUED], shop[CallStatus.SUCCESS]) == (4, 1)
    assert (await store.count_by_status(at_most=10))[CallStatus.QUEUED] == 4


async def test_cursor_paging_while_rows_are_added(store: SqlDatastore) -> None:
    existing = [call() for _ in range(25)]
    for c in existing:
        await store.record_queued(c)
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_calls(CallFilter(limit=7, cursor=cursor))
        seen.extend(r.id for r in page.items)
        for _ in range(3):  # newer calls arrive between pages
            await store.record_queued(call())
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == sorted((c.id for c in existing), reverse=True)


async def test_calls_are_listed_newest_first_whatever_their_ids(store: SqlDatastore) -> None:
    base = utcnow() - timedelta(minutes=5)
    # a producer's own ids and RQ-style ids, created in this order; two at the same time
    made = [("zz-first", 0), ("5f0e9a1c-3b1d-4c55-9f0a-2a6f4b8c9d10", 1), ("aa.third", 2),
            ("tie:b", 3), ("tie:a", 3), ("m_last", 4)]  # fmt: skip
    for call_id, minute in made:
        c = Call(id=call_id, app="shop", fn="resize", created_at=base + timedelta(minutes=minute))
        await store.record_queued(c)
    expected = ["m_last", "tie:b", "tie:a", "aa.third", made[1][0], "zz-first"]
    seen: list[str] = []
    cursor = None
    while True:  # pages of two: one ends between the two calls made at the same time
        page = await store.list_calls(CallFilter(limit=2, cursor=cursor))
        seen.extend(r.id for r in page.items)
        if (cursor := page.next_cursor) is None:
            break
    assert seen == expected
    since = await store.list_calls(CallFilter(since=base + timedelta(minutes=3)))
    assert [r.id for r in since.items] == expected[:3]


async def test_a_page_of_unindexed_filters_reads_a_bounded_walk(
    store: SqlDatastore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index holds app and status together: a page walks the app's calls and checks
    the status of each, at most LIST_WALK_MAX of them. A page that found fewer than
    its limit there ends at the last call it read; the next page goes on from it."""
    monkeypatch.setattr(reading, "LIST_WALK_MAX", 5)
    base = utcnow() - timedelta(hours=1)
    made = [Call(f"c{i:02d}", "shop", "resize", created_at=base + timedelta(seconds=i))
            for i in range(20)]  # fmt: skip
    made.append(Call("other", "blog", "resize", created_at=base + timedelta(seconds=30)))
    for c in made:
        await store.record_queued(c)
    for c in (made[2], made[10], made[20]):
        await store.record_outcome(c, failed(), 1, "w")
    pages: list[list[str]] = []
    cursor = None
    while True:
        f = CallFilter(app="shop", status=CallStatus.ERROR, limit=30, cursor=cursor)
        page = await store.list_calls(f)
        pages.append([r.id for r in page.items])
        if (cursor := page.next_cursor) is None:
            break
    # c19..c15, c14..c10, c09..c05, c04..c00, then nothing older
    assert pages == [[], ["c10"], [], ["c02"], []]
    dense = await store.list_calls(CallFilter(app="shop", status=CallStatus.QUEUED, limit=3))
    assert [r.id for r in dense.items] == ["c19", "c18", "c17"]  # a full page: its own cursor
    assert dense.next_cursor == encode_cursor(dense.items[-1].created_at, "c17")


# ------------------------------------------------------------------- purge


async def test_purge_removes_only_old_final_calls_with_logs(store: SqlDatastore) -> None:
    old_done, live = call(), call()
    await store.record_outcome(old_done, success(log=b"old"), 1, "w")
    await store.record_running(live, 1, "w")
    assert await store.purge_calls(timedelta(hours=1)) == 0
    assert await store.purge_calls(timedelta(0)) == 1
    assert await store.get_call(old_done.id) is None
    assert await store.get_log(old_done.id) is None
    assert await store.get_call(live.id) is not None


# ---------------------------------------------------------------- batching


async def test_many_concurrent_outcomes_are_batched_and_durable(make_store: MakeStore) -> None:
    store = await make_store()
    calls = [call() for _ in range(400)]

    async def complete(c: Call) -> bool:
        await store.record_running(c, 1, "w")
        return await store.record_outcome(c, success(log=c.id.encode()), 1, "w")

    batches_before = store.writer.batches  # type: ignore[attr-defined]
    assert all(await asyncio.gather(*(complete(c) for c in calls)))
    batches = store.writer.batches - batches_before  # type: ignore[attr-defined]
    assert batches < len(calls)  # many writes shared a transaction
    await store.close()

    reopened = await make_store()  # what was acknowledged is on disk
    assert (await reopened.count_by_status())[CallStatus.SUCCESS] == len(calls)
    assert await reopened.get_log(calls[-1].id) == calls[-1].id.encode()


async def test_close_flushes_pending_writes(make_store: MakeStore) -> None:
    store = await make_store()
    calls = [call() for _ in range(50)]
    pending = [asyncio.ensure_future(store.record_outcome(c, success(), 1, "w")) for c in calls]
    await asyncio.sleep(0)  # let them enqueue
    await store.close()
    assert all(await asyncio.gather(*pending))
    reopened = await make_store()
    assert (await reopened.count_by_status())[CallStatus.SUCCESS] == 50


# -------------------------------------------------------------- file logs


async def test_file_log_store(
    make_store: MakeStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_dir = tmp_path_factory.mktemp("logs")
    store = await make_store(log_url=f"file://{log_dir}")
    c = call()
    await store.record_running(c, 1, "w")
    assert await store.record_outcome(c, success(log=b"to a file\n"), 1, "w")
    assert await store.get_log(c.id) == b"to a file\n"
    assert list(log_dir.rglob(f"{c.id}.log"))
    # a duplicate delivery leaves the stored log alone
    assert not await store.record_outcome(c, success(log=b"second run\n"), 2, "w")
    assert await store.get_log(c.id) == b"to a file\n"
    assert await store.purge_calls(timedelta(0)) == 1
    assert await store.get_log(c.id) is None
    assert not list(log_dir.rglob("*.log"))


async def test_text_with_nul_characters_is_stored(store: SqlDatastore) -> None:
    c = call()
    await store.record_outcome(c, failed("function failed: a\x00b"), 1, "w")
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.ERROR
    assert rec.error == "function failed: a\ufffdb"


@pytest.mark.parametrize("logs", ["table", "files"])
async def test_an_attempt_that_never_started_keeps_whether_the_last_log_was_cut(
    make_store: MakeStore, tmp_path_factory: pytest.TempPathFactory, logs: str
) -> None:
    log_url = f"file://{tmp_path_factory.mktemp('logs')}" if logs == "files" else ""
    store = await make_store(log_url=log_url, max_log_size_bytes=100)
    c = call()
    await store.record_running(c, 0, "w1")
    now = utcnow()
    ran = Outcome(CallStatus.ERROR, "crashed", FailureKind.FUNCTION, log=b"x" * 1000,
                  started_at=now, completed_at=now)  # fmt: skip
    assert await store.record_retry(c, ran, 1, now)
    await store.record_running(c, 0, "w1")
    assert await store.record_retry(c, HANDED_BACK, 1, utcnow(), running_on="w1")
    rec = await store.get_call(c.id)
    log = await store.get_log(c.id)
    assert rec is not None and log is not None and log.startswith(b"x" * 100)
    assert rec.log_truncated  # the log kept is the cut one
    # A record the hand-back creates has no log, and nothing was cut.
    fresh = call()
    assert await store.record_retry(fresh, HANDED_BACK, 0, utcnow(), running_on="w1")
    rec = await store.get_call(fresh.id)
    assert rec is not None and not rec.log_truncated and await store.get_log(fresh.id) is None


async def test_times_far_from_now_are_stored_to_the_microsecond(store: SqlDatastore) -> None:
    # The latest millisecond a message may name (mq.wire), and two calls at it.
    far = datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    early = datetime(1000, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    made = [Call(id=i, app="shop", fn="resize", created_at=t)
            for i, t in (("b", far), ("a", far), ("c", early))]  # fmt: skip
    for c in made:
        await store.record_queued(c)
        rec = await store.get_call(c.id)
        assert rec is not None and rec.created_at == c.created_at
    seen: list[str] = []
    cursor = None
    while True:  # the cursor names the stored time: the page after it starts right there
        page = await store.list_calls(CallFilter(limit=1, cursor=cursor))
        seen.extend(r.id for r in page.items)
        if (cursor := page.next_cursor) is None:
            break
    assert seen == ["b", "a", "c"]
    since = await store.list_calls(CallFilter(since=far))
    assert [r.id for r in since.items] == ["b", "a"]


async def test_a_write_the_driver_refuses_fails_alone_in_its_batch(store: SqlDatastore) -> None:
    # A lone surrogate (bytes that were not UTF-8) cannot be sent as text at all.
    bad, good = call(), call()
    results = await asyncio.gather(
        store.record_running(bad, 1, "w\udcff"),
        store.record_outcome(good, success(), 1, "w"),
        return_exceptions=True,
    )
    assert isinstance(results[0], StoreError)
    assert results[1] is True
    rec = await store.get_call(good.id)
    assert rec is not None and rec.status is CallStatus.SUCCESS
    assert await store.get_call(bad.id) is None


async def test_text_with_lone_surrogates_is_stored(store: SqlDatastore) -> None:
    # Bytes that were not UTF-8 (Python keeps them as lone surrogates) in an error text.
    c, buried = call(), call()
    assert await store.record_outcome(c, failed("output: \udcff\udcfe!"), 1, "w")
    rec = await store.get_call(c.id)
    assert rec is not None and rec.error == "output: \ufffd\ufffd!"
    await store.record_queued(buried)
    assert await store.end_buried(buried.id, "lost \udc80", utcnow())
    rec = await store.get_call(buried.id)
    assert rec is not None and rec.error == "lost \ufffd"


async def test_the_next_attempt_clears_the_last_ones_failure_with_its_error(
    store: SqlDatastore,
) -> None:
    c = call()
    await store.record_running(c, 1, "w")
    await store.record_retry(c, failed(), 1, utcnow())
    queued = await store.get_call(c.id)
    assert queued is not None and queued.failure is FailureKind.FUNCTION  # shown while queued
    running = await store.record_running(c, 2, "w")
    assert (running.status, running.error, running.failure) == (CallStatus.RUNNING, None, None)
