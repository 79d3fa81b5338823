"""Each call's request is kept, and a finished call can be run again (both backends)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

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
from datastore.base import CallFilter
from datastore.common import SqlDatastore
from datastore.errors import CallNotFinal, CallNotFound, RequestNotStored
from tests.datastore.conftest import MakeStore

pytestmark = pytest.mark.integration

BINARY = bytes(range(256))


def call(body: bytes = b'{"n": 1}', priority: int = 2) -> Call:
    return Call(new_call_id(), "shop", "resize", body, {"X-Trace": "t-1"}, priority=priority)


def failed() -> Outcome:
    now = utcnow()
    return Outcome(CallStatus.ERROR, error="boom", failure=FailureKind.FUNCTION,
                   response=Response(500, {"A": "b"}, b"bad"), log=b"trace\n",
                   log_truncated=True, container_id="c-9", started_at=now, completed_at=now,
                   stats={"cpu_ms": 1.0})  # fmt: skip


async def test_the_first_write_stores_the_request_and_later_ones_keep_it(
    store: SqlDatastore,
) -> None:
    queued, direct, early = call(), call(BINARY, 0), call(b"late")
    await store.record_queued(queued, "img:1")
    # the same id delivered with another body: the stored request stays the first one
    other = Call(queued.id, "shop", "resize", b"other", {"Y": "2"}, priority=0)
    running = await store.record_running(other, 0, "w")
    assert running.has_request and running.request_body is None  # bodies are read by get_call
    assert dict(running.request_headers) == {"X-Trace": "t-1"}
    await store.record_outcome(other, failed(), 1, "w")
    # no queued record (redis-cli, the Python producer): record_running stores it
    await store.record_running(direct, 0, "w")
    await store.record_retry(Call(direct.id, "shop", "resize", b"x"), failed(), 1, utcnow())
    # a call that never ran (expired, function unknown): the outcome stores it
    await store.record_outcome(early, Outcome(CallStatus.CANCELLED, error="expired"), 0, "w")

    for c in (queued, direct, early):
        rec = await store.get_call(c.id)
        assert rec is not None and rec.has_request
        assert (rec.request_body, dict(rec.request_headers), rec.request_priority) == (
            c.body, {"X-Trace": "t-1"}, c.priority)  # fmt: skip
    shown = (await store.get_call(direct.id)).to_json()  # type: ignore[union-attr]
    assert shown["request"]["body_encoding"] == "base64"
    assert shown["request"]["headers"] == {"X-Trace": "t-1"}
    listed = (await store.list_calls(CallFilter())).items
    assert {r.id for r in listed} == {queued.id, direct.id, early.id}
    assert all(r.has_request and r.request_body is None for r in listed)


async def test_no_request_is_stored_over_the_size_limit(make_store: MakeStore) -> None:
    store = await make_store(max_request_size=16)
    small, big = call(b"x" * 16), call(b"x" * 17)
    for c in (small, big):
        await store.record_running(c, 0, "w")
        await store.record_outcome(c, failed(), 1, "w")
    assert (await store.get_call(small.id)).request_body == b"x" * 16  # type: ignore[union-attr]
    rec = await store.get_call(big.id)
    assert rec is not None and not rec.has_request and rec.to_json()["request"] is None
    with pytest.raises(RequestNotStored, match="no stored request"):
        await store.retry_call(big.id)


async def test_retry_puts_a_final_call_back_to_queued(store: SqlDatastore) -> None:
    await store.create_fn(Function("shop", "resize", "shop/resize:2"))
    c = call()
    await store.record_queued(c, "shop/resize:1")
    await store.record_running(c, 0, "w1")
    await store.record_outcome(c, failed(), 1, "w1")
    assert await store.get_log(c.id) == b"trace\n"

    before = utcnow()
    again = await store.retry_call(c.id)
    assert (again.id, again.app, again.fn, again.body, dict(again.headers), again.priority) == (
        c.id, "shop", "resize", c.body, {"X-Trace": "t-1"}, 2)  # fmt: skip
    assert again.created_at >= before and again.delay_s == 0
    rec = await store.get_call(c.id)
    assert rec is not None
    assert (rec.status, rec.attempts, rec.image) == (CallStatus.QUEUED, 0, "shop/resize:2")
    assert rec.created_at == again.created_at
    cleared = (rec.error, rec.failure, rec.started_at, rec.completed_at, rec.worker_id,
               rec.container_id, rec.response_status, rec.next_try_at)  # fmt: skip
    assert cleared == (None,) * 8
    assert (rec.response_body, dict(rec.stats), rec.log_truncated) == (b"", {}, False)
    assert rec.request_body == c.body and await store.get_log(c.id) is None

    # it runs again as a new call: attempt 1, and this time it succeeds
    running = await store.record_running(again, 0, "w2")
    assert (running.status, running.attempts) == (CallStatus.RUNNING, 1)
    now = utcnow()
    ok = Outcome(CallStatus.SUCCESS, response=Response(200, body=b"fine"), log=b"ok\n",
                 started_at=now, completed_at=now)  # fmt: skip
    assert await store.record_outcome(again, ok, 1, "w2") is True
    done = await store.get_call(c.id)
    assert done is not None and (done.status, done.response_body) == (CallStatus.SUCCESS, b"fine")
    assert await store.get_log(c.id) == b"ok\n"


async def test_retry_refuses_unknown_and_live_calls(store: SqlDatastore) -> None:
    with pytest.raises(CallNotFound, match="no call NOPE"):
        await store.retry_call("NOPE")
    c = call()
    await store.record_queued(c)
    with pytest.raises(CallNotFinal, match=f"call {c.id} is still queued; cancel it first"):
        await store.retry_call(c.id)
    await store.record_running(c, 0, "w")
    with pytest.raises(CallNotFinal, match=f"call {c.id} is still running; cancel it first"):
        await store.retry_call(c.id)
    # a record written without the request (as before migration 0003)
    bare = call()
    await store.record_outcome(bare, failed(), 1, "w")
    with pytest.raises(RequestNotStored):
        await store.retry_call(bare.id)
    assert (await store.get_call(bare.id)).status is CallStatus.ERROR  # type: ignore[union-attr]


async def test_reopen_puts_a_final_call_back_without_a_stored_request(
    make_store: MakeStore,
) -> None:
    # a requeued dead letter carries its own request: the record need not hold one
    store = await make_store(max_request_size=4)
    c = call(b"too big to keep")
    await store.record_running(c, 0, "w")
    await store.record_outcome(c, failed(), 1, "w")
    assert not (await store.get_call(c.id)).has_request  # type: ignore[union-attr]
    assert await store.reopen_call(c.id) is True
    rec = await store.get_call(c.id)
    assert rec is not None and (rec.status, rec.attempts, rec.error) == (CallStatus.QUEUED, 0, None)
    assert await store.get_log(c.id) is None
    # only a final record is reopened; an unknown id is no error
    assert await store.reopen_call(c.id) is False
    assert await store.reopen_call("NOPE") is False
    live = call()
    await store.record_running(live, 0, "w")
    assert await store.reopen_call(live.id) is False
    assert (await store.get_call(live.id)).status is CallStatus.RUNNING  # type: ignore[union-attr]


async def test_retry_of_a_cancelled_call_clears_the_cancel(store: SqlDatastore) -> None:
    c = call()
    await store.record_queued(c)
    await store.record_running(c, 0, "w")
    await store.request_cancel(c.id)
    await store.record_outcome(c, Outcome(CallStatus.CANCELLED, failure=FailureKind.CANCELLED),
                               1, "w")  # fmt: skip
    assert await store.cancel_requested([c.id]) == {c.id}
    await store.retry_call(c.id)
    assert await store.cancel_requested([c.id]) == set()
    # a retry now really runs (no leftover cancel turns it into cancelled)
    await store.record_running(c, 0, "w")
    await store.record_retry(c, failed(), 1, utcnow() + timedelta(seconds=1))
    rec = await store.get_call(c.id)
    assert rec is not None and rec.status is CallStatus.QUEUED


async def test_concurrent_retries_requeue_once(store: SqlDatastore) -> None:
    c = call()
    await store.record_running(c, 0, "w")
    await store.record_outcome(c, failed(), 1, "w")
    results = await asyncio.gather(*(store.retry_call(c.id) for _ in range(4)),
                                   return_exceptions=True)  # fmt: skip
    assert sum(isinstance(r, Call) for r in results) == 1
    assert all(isinstance(r, CallNotFinal) for r in results if not isinstance(r, Call)), results


async def test_retry_deletes_the_log_in_a_log_directory(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = await make_store(log_url=f"file://{tmp_path / 'logs'}")
    c = call()
    await store.record_running(c, 0, "w")
    await store.record_outcome(c, failed(), 1, "w")
    assert await store.get_log(c.id) == b"trace\n"
    await store.retry_call(c.id)
    assert await store.get_log(c.id) is None
