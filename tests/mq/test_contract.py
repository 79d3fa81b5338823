"""The queue contract, run on every backend (SQLite file, real redis-server)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
import redis

from config.domain import Call, new_call_id
from mq.base import Message, MessageQueue, QueueStats, lapsed_reason
from mq.errors import InvalidCall, ReservationLost
from tests.mq.conftest import QueueMaker

pytestmark = pytest.mark.integration

SHORT = {"mq_reservation_msecs": 1000}


def call(body: bytes = b"x", **kw: object) -> Call:
    return Call(id=new_call_id(), app="demo", fn="echo", body=body, **kw)  # type: ignore[arg-type]


async def drain(queue: MessageQueue, timeout_s: float = 0.2) -> list[Message]:
    out: list[Message] = []
    while batch := await queue.reserve_many(50, timeout_s):
        out += batch
    return out


async def test_round_trip_keeps_every_field(queues: QueueMaker) -> None:
    q = queues()
    created = datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)
    sent = Call(
        id="order-42",
        app="shop",
        fn="invoice",
        body=bytes(range(256)),
        headers={"Content-Type": "application/octet-stream", "X-Trace": "a b c"},
        created_at=created,
        priority=1,
    )
    assert await q.push(sent) == "order-42"
    msg = await q.reserve(1.0)
    assert msg is not None
    assert msg.deliveries == 1
    assert msg.priority == 1
    got = msg.call
    assert (got.id, got.app, got.fn, got.body) == (sent.id, sent.app, sent.fn, sent.body)
    assert dict(got.headers) == dict(sent.headers)
    assert got.created_at == created
    await q.ack(msg)
    assert await q.stats() == QueueStats(ready=0, delayed=0, reserved=0, dead=0)


async def test_empty_reserve_waits_for_timeout_without_spinning(queues: QueueMaker) -> None:
    q = queues()
    await q.stats()
    cpu0, t0 = time.process_time(), time.monotonic()
    assert await q.reserve(0.8) is None
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    assert 0.75 <= wall < 2.0
    assert cpu < 0.3 * wall, f"waiting burnt {cpu:.3f}s CPU in {wall:.3f}s"


async def test_waiting_consumer_wakes_for_another_producer(queues: QueueMaker) -> None:
    consumer, producer = queues(), queues()
    await consumer.stats()

    async def push_later() -> str:
        await asyncio.sleep(0.3)
        return await producer.push(call(b"late"))

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        pushed = tg.create_task(push_later())
        msg = await consumer.reserve(10.0)
    assert msg is not None and msg.call.id == pushed.result()
    assert time.monotonic() - t0 < 1.5


async def test_reserved_message_is_invisible_until_acked(queues: QueueMaker) -> None:
    a, b = queues(), queues()
    await a.push(call())
    msg = await a.reserve(1.0)
    assert msg is not None
    assert await b.reserve(0.3) is None
    assert (await b.stats()).reserved == 1
    await a.ack(msg)
    await a.ack(msg)  # twice is harmless
    assert await b.reserve(0.2) is None
    assert await b.stats() == QueueStats(0, 0, 0, 0)


async def test_lapsed_reservation_is_delivered_again(queues: QueueMaker) -> None:
    a, b = queues(**SHORT), queues(**SHORT)
    sent = await a.push(call())
    first = await a.reserve(1.0)
    assert first is not None and first.deliveries == 1
    t0 = time.monotonic()
    again = await b.reserve(5.0)
    assert again is not None and again.call.id == sent
    assert again.deliveries == 2
    assert 0.9 <= time.monotonic() - t0 < 3.0
    with pytest.raises(ReservationLost):
        await a.extend(first)
    await b.ack(again)
    assert (await b.stats()).reserved == 0


async def test_extend_keeps_the_reservation(queues: QueueMaker) -> None:
    a, b = queues(**SHORT), queues(**SHORT)
    await a.push(call())
    msg = await a.reserve(1.0)
    assert msg is not None
    for _ in range(3):  # 1.8 s in all, well past one reservation
        await asyncio.sleep(0.6)
        await a.extend(msg)
        assert await b.reserve(0.0) is None
    await a.ack(msg)
    assert await b.reserve(0.3) is None


async def test_release_hands_back_without_charging_a_delivery(queues: QueueMaker) -> None:
    a, b = queues(), queues()
    await a.push(call())
    msg = await a.reserve(1.0)
    assert msg is not None
    await a.release(msg)
    again = await b.reserve(1.0)
    assert again is not None and again.call.id == msg.call.id
    assert again.deliveries == 1
    await a.release(msg)  # a stale release does not take it from b
    assert await a.reserve(0.2) is None
    await b.ack(again)


async def test_release_with_delay(queues: QueueMaker) -> None:
    q = queues()
    await q.push(call())
    msg = await q.reserve(1.0)
    assert msg is not None
    await q.release(msg, delay_s=0.6)
    assert (await q.stats()).delayed == 1
    assert await q.reserve(0.3) is None
    t0 = time.monotonic()
    again = await q.reserve(3.0)
    assert again is not None and again.deliveries == 1
    assert time.monotonic() - t0 < 1.5
    await q.ack(again)


async def test_a_delayed_release_reaches_a_reserve_already_waiting(queues: QueueMaker) -> None:
    # A worker releases a call for a retry while its own intake waits on the same
    # queue object: the retry is taken when it comes due, not when the wait ends.
    q = queues()
    await q.push(call())
    msg = await q.reserve(1.0)
    assert msg is not None
    waiting = asyncio.create_task(q.reserve(10.0))
    await asyncio.sleep(0.2)  # the reserve is waiting now
    t0 = time.monotonic()
    await q.release(msg, delay_s=0.3)
    again = await asyncio.wait_for(waiting, 10.0)
    assert again is not None and again.call.id == msg.call.id
    assert 0.25 <= time.monotonic() - t0 < 2.0
    await q.ack(again)


async def test_delayed_push_becomes_visible_at_its_time(queues: QueueMaker) -> None:
    q = queues()
    t0 = time.monotonic()
    now_id = await q.push(call(b"now"))
    later_id = await q.push(call(b"later"), delay_s=0.7)
    own_delay = await q.push(call(b"own", delay_s=0.7))
    first = await q.reserve(1.0)
    assert first is not None and first.call.id == now_id
    assert await q.reserve(0.2) is None
    late = await q.reserve_many(5, 3.0)
    got = {m.call.id for m in late}
    while len(got) < 2:
        got |= {m.call.id for m in await q.reserve_many(5, 3.0)}
    assert got == {later_id, own_delay}
    assert 0.65 <= time.monotonic() - t0 < 2.5


async def test_priorities_first_then_fifo(queues: QueueMaker) -> None:
    q = queues()
    sent = [call(f"{i}".encode(), priority=i % 3) for i in range(12)]
    await q.push_many(sent[:6])
    for c in sent[6:]:
        await q.push(c)
    got = [m.call.id for m in await drain(q)]
    want = [c.id for p in (2, 1, 0) for c in sent if c.priority == p]
    assert got == want


async def test_push_keywords_override_the_call(queues: QueueMaker) -> None:
    q = queues()
    low = await q.push(call(priority=2), priority=0)
    high = await q.push(call(priority=0), priority=2)
    got = await drain(q)
    assert [(m.call.id, m.priority) for m in got] == [(high, 2), (low, 0)]


async def test_same_id_is_one_message_while_queued_or_reserved(queues: QueueMaker) -> None:
    q = queues()
    c = Call(id="same-1", app="demo", fn="echo", body=b"first")
    await q.push(c)
    await q.push(Call(id="same-1", app="demo", fn="echo", body=b"second"))
    await q.push_many([c, c])
    assert (await q.stats()).ready == 1
    msg = await q.reserve(1.0)
    assert msg is not None and msg.call.body == b"first"
    await q.push(c)  # still reserved: dropped
    assert (await q.stats()).ready == 0
    await q.ack(msg)
    await q.push(c)  # gone: may be queued again
    assert (await q.stats()).ready == 1


async def test_push_new_reports_whether_it_queued_a_message(queues: QueueMaker) -> None:
    q = queues()
    first = Call(id="new-1", app="demo", fn="echo", body=b"first")
    second = Call(id="new-1", app="demo", fn="echo", body=b"second")
    assert await q.push_new(first) is True
    assert await q.push_new(second) is False  # queued: the first stays
    assert await q.push_new(second, delay_s=30) is False
    msg = await q.reserve(1.0)
    assert msg is not None and msg.call.body == b"first"
    assert await q.push_new(second) is False  # reserved
    await q.ack(msg)
    assert await q.push_new(second) is True  # acked: the id is free again
    msg = await q.reserve(1.0)
    assert msg is not None and (msg.call.body, msg.deliveries) == (b"second", 1)
    await q.dead_letter(msg, "gave up")
    assert await q.push_new(first) is True  # dead: free again too
    assert await q.stats() == QueueStats(ready=1, delayed=0, reserved=0, dead=1)


async def test_push_new_sees_a_delayed_message(queues: QueueMaker) -> None:
    q = queues()
    later = Call(id="later-1", app="demo", fn="echo", body=b"later", delay_s=30)
    assert await q.push_new(later) is True
    assert await q.push_new(Call(id="later-1", app="demo", fn="echo", body=b"now")) is False
    assert await q.push_new(later, delay_s=0) is False
    assert await q.reserve(0.1) is None
    assert await q.stats() == QueueStats(ready=0, delayed=1, reserved=0, dead=0)


async def test_max_deliveries_moves_to_dead_letters(queues: QueueMaker) -> None:
    q = queues(mq_reservation_msecs=1000, mq_max_deliveries=2)
    sent = await q.push(call())
    first = await q.reserve(1.0)
    second = await q.reserve(5.0)
    assert first is not None and second is not None
    assert (first.deliveries, second.deliveries) == (1, 2)
    assert await q.reserve(2.0) is None  # lapses a second time: dead, not delivered
    deadline = time.monotonic() + 3
    while not (dead := await q.dead_list()) and time.monotonic() < deadline:
        await q.reserve(0.3)
    assert [d.id for d in dead] == [sent]
    assert dead[0].deliveries == 2
    assert "lapsed" in dead[0].reason
    assert dead[0].call is not None and dead[0].call.id == sent


async def test_a_burial_is_reported_once_to_the_consumer_that_made_it(
    queues: QueueMaker,
) -> None:
    gone, q = queues(**SHORT, mq_max_deliveries=1), queues(**SHORT, mq_max_deliveries=1)
    sent = await q.push(call())
    taken = await gone.reserve(1.0)  # and never acked: its consumer died
    assert taken is not None and taken.call.id == sent
    before, t0 = datetime.now(UTC), time.monotonic()
    assert await q.reserve(10.0) is None  # it buries the message, and says so at once
    assert time.monotonic() - t0 < 5
    buried = q.take_buried()
    assert [b.call_id for b in buried] == [sent]
    assert buried[0].reason == lapsed_reason(1)
    assert buried[0].reason == "delivered 1 time(s); the reservation lapsed each time"
    assert before <= buried[0].died_at <= datetime.now(UTC)
    assert q.take_buried() == [] and gone.take_buried() == []
    # the dead letter says what the consumer was told
    assert [(d.id, d.reason) for d in await q.dead_list()] == [(sent, buried[0].reason)]


async def test_dead_letters_list_requeue_purge(queues: QueueMaker) -> None:
    q = queues()
    ids = await q.push_many([call(b"a"), call(b"b"), call(b"c")])
    for msg in await drain(q):
        await q.dead_letter(msg, f"gave up on {msg.call.body.decode()}")
    dead = await q.dead_list()
    assert [d.id for d in dead] == ids
    assert [d.reason for d in dead] == ["gave up on a", "gave up on b", "gave up on c"]
    assert all(d.deliveries == 1 and d.call is not None for d in dead)
    assert b'"a"' in dead[0].raw
    assert (await q.stats()).dead == 3
    assert await q.dead_among(["no-such-id", ids[2], ids[0]]) == [ids[2], ids[0]]
    assert await q.dead_among([]) == []
    assert await q.dead_requeue([ids[0], "no-such-id"]) == 1
    back = await drain(q)
    assert [(m.call.id, m.deliveries) for m in back] == [(ids[0], 1)]
    await q.ack(back[0])
    assert await q.dead_purge([ids[1]]) == 1
    assert await q.dead_requeue() == 1
    assert [m.call.id for m in await drain(q)] == [ids[2]]
    await q.push(call())
    last = await q.reserve(1.0)
    assert last is not None
    await q.dead_letter(last, "x")
    assert await q.dead_purge() == 1
    assert (await q.stats()).dead == 0


async def test_a_requeued_dead_letter_starts_its_age_again(queues: QueueMaker) -> None:
    q = queues()
    old = datetime(2020, 1, 1, tzinfo=UTC)
    [sent] = await q.push_many([Call(new_call_id(), "a", "f", b"old", created_at=old)])
    [msg] = await drain(q)
    assert msg.call.created_at == old
    await q.dead_letter(msg, "gave up")
    before = datetime.now(UTC).replace(microsecond=0)
    assert await q.dead_requeue([sent]) == 1
    [back] = await drain(q)
    assert back.call.id == sent and back.call.body == b"old"
    assert before <= back.call.created_at <= datetime.now(UTC)


async def test_push_rejects_what_a_consumer_would_bury(queues: QueueMaker) -> None:
    q = queues(max_request_size=100)
    with pytest.raises(InvalidCall, match="exceeds"):
        await q.push(call(b"x" * 101))
    with pytest.raises(InvalidCall, match="priority"):
        await q.push(call(), priority=3)
    with pytest.raises(InvalidCall, match="header"):
        await q.push(call(headers={"Bad Name": "v"}))
    with pytest.raises(InvalidCall, match="created"):  # before the epoch: not on the wire
        await q.push(call(created_at=datetime(1969, 12, 31, tzinfo=UTC)))
    assert await q.push(call(b"x" * 100))
    assert (await q.stats()).dead == 0


async def test_malformed_messages_go_to_dead_letters(queues: QueueMaker) -> None:
    q = queues(max_request_size=64)
    await q.stats()
    if queues.backend == "redis":
        bad = {
            "headers are not JSON": {"app": b"a", "fn": b"f", "id": b"m1", "headers": b"{nope"},
            "missing required field(s): app": {"fn": b"f", "id": b"m2"},
            "priority": {"app": b"a", "fn": b"f", "id": b"m3", "priority": b"high"},
            "exceeds": {"app": b"a", "fn": b"f", "id": b"m4", "body": b"y" * 65},
            "unknown field": {"app": b"a", "fn": b"f", "id": b"m5", "dealy": b"3"},
            # past what a datetime holds: once an OverflowError that stopped the consumer
            "created '99999999999999999999999' is not milliseconds": {
                "app": b"a",
                "fn": b"f",
                "id": b"m6",
                "created": b"99999999999999999999999",
            },
        }
    else:
        bad = {
            "not JSON": {"payload": b"{nope"},
            "'app' is missing": {"payload": b'{"id":"m2","fn":"f"}'},
            "body is not a string": {"payload": b'{"id":"m3","app":"a","fn":"f","body":7}'},
            "exceeds": {"payload": b'{"id":"m4","app":"a","fn":"f","body":"' + b"y" * 65 + b'"}'},
            "unknown field": {"payload": b'{"id":"m5","app":"a","fn":"f","dealy":3}'},
            "created '253402300800000' is not milliseconds": {
                "payload": b'{"id":"m6","app":"a","fn":"f","created":253402300800000}'
            },
        }
    for i, fields in enumerate(bad.values()):
        queues.inject_raw(fields, msg_id=f"m{i + 1}")
    if queues.backend == "redis":  # behind the bad ones in the producers' stream
        queues.inject_raw({"app": b"a", "fn": b"f", "id": b"good", "body": b"fine"})
    else:
        await q.push(Call(id="good", app="a", fn="f", body=b"fine"))
    msg = await q.reserve(2.0)
    assert msg is not None and msg.call.id == "good" and msg.call.body == b"fine"
    await q.ack(msg)
    dead = await q.dead_list()
    assert len(dead) == len(bad)
    for (expected, _), letter in zip(bad.items(), dead, strict=True):
        assert expected in letter.reason, letter.reason
        assert letter.reason.startswith("malformed message")
        assert letter.call is None
    assert (await q.stats()).dead == len(bad)
    buried = q.take_buried()
    if queues.backend == "redis":
        # Producers' entries not yet routed: an id there may be a live call's, with a
        # message (and a record) of its own. (Routed ones are: see test_buried.py.)
        assert buried == []
    else:  # one row per id: a record of that id is this message's
        assert sorted(b.call_id for b in buried) == [f"m{i + 1}" for i in range(len(bad))]
        assert {b.call_id: b.reason for b in buried} == {d.id: d.reason for d in dead}


async def test_cancelled_reserve_loses_nothing(queues: QueueMaker) -> None:
    a, b = queues(), queues()
    await a.stats()
    waiter = asyncio.create_task(a.reserve(10.0))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    sent = await b.push(call())
    msg = await b.reserve(2.0)
    assert msg is not None and msg.call.id == sent and msg.deliveries == 1


async def test_reserve_many_takes_a_batch(queues: QueueMaker) -> None:
    q = queues()
    ids = await q.push_many([call(str(i).encode()) for i in range(25)])
    batch = await q.reserve_many(10, 1.0)
    assert [m.call.id for m in batch] == ids[:10]
    assert (await q.stats()) == QueueStats(ready=15, delayed=0, reserved=10, dead=0)
    await q.ack_many(batch)
    rest = await drain(q)
    assert [m.call.id for m in rest] == ids[10:]


async def _unblocked(queues: QueueMaker) -> None:
    """Until Redis has let go of a cancelled blocking read: an entry it hands to that
    read in the meantime is reserved by no one until its reservation lapses."""
    if queues.backend != "redis":
        return
    client = redis.Redis(port=queues.redis_port)
    try:
        for _ in range(200):
            if client.info("clients")["blocked_clients"] == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the cancelled read still blocks on the server")
    finally:
        client.close()


async def test_reserve_many_acks_what_it_is_given_first(queues: QueueMaker) -> None:
    q = queues()
    ids = await q.push_many([call(str(i).encode()) for i in range(6)])
    held = await q.reserve_many(4, 1.0)
    assert [m.call.id for m in held] == ids[:4]
    more = await q.reserve_many(1, 1.0, ack=held[:2])
    assert [m.call.id for m in more] == ids[4:5]
    assert (await q.stats()) == QueueStats(ready=1, delayed=0, reserved=3, dead=0)
    rest = await q.reserve_many(5, 1.0, ack=[*held[2:], *more])
    assert [m.call.id for m in rest] == ids[5:]
    # Also when nothing comes; and the acks are done (and said to be) before the wait.
    acked = asyncio.Event()
    waiting = asyncio.create_task(q.reserve_many(5, 10.0, ack=rest, on_acked=acked.set))
    await asyncio.wait_for(acked.wait(), 2.0)
    assert not waiting.done()
    assert (await q.stats()) == QueueStats(ready=0, delayed=0, reserved=0, dead=0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await _unblocked(queues)
    # An id acked this way may be queued again, as after any ack.
    await q.push(Call(id=ids[0], app="demo", fn="echo", body=b"again"))
    again = await q.reserve(1.0)
    assert again is not None and (again.call.id, again.call.body) == (ids[0], b"again")


async def test_an_old_delivery_cannot_touch_the_new_one(queues: QueueMaker) -> None:
    q = queues(**SHORT)
    await q.push(call())
    first = await q.reserve(1.0)
    assert first is not None
    second = await q.reserve(5.0)  # the same consumer gets it again after the lapse
    assert second is not None and second.call.id == first.call.id
    assert second.deliveries == 2
    with pytest.raises(ReservationLost):
        await q.extend(first)
    await q.release(first)  # stale: ignored
    assert (await q.stats()).reserved == 1
    await q.extend(second)
    await q.ack(second)
    assert await q.stats() == QueueStats(0, 0, 0, 0)


async def test_an_ack_after_a_release_leaves_the_message(queues: QueueMaker) -> None:
    # The delivery was handed back for a retry: a late ack or dead_letter of it must not
    # take the retry away (SQLite deleted it).
    q = queues()
    await q.push(call())
    msg = await q.reserve(1.0)
    assert msg is not None
    await q.release(msg, delay_s=30)
    await q.ack(msg)
    await q.dead_letter(msg, "late")
    assert await q.stats() == QueueStats(ready=0, delayed=1, reserved=0, dead=0)


async def test_a_second_ack_leaves_the_ids_next_message(queues: QueueMaker) -> None:
    # Acked, then the id queued again: acking the old delivery again (harmless, says the
    # protocol) must not remove the new message (on SQLite it took the old row's seq).
    q = queues()
    again = Call(id="again-1", app="demo", fn="echo", body=b"first")
    await q.push(again)
    msg = await q.reserve(1.0)
    assert msg is not None
    await q.ack(msg)
    await q.push(again)
    await q.ack(msg)
    await q.ack_many([msg])
    assert await q.stats() == QueueStats(ready=1, delayed=0, reserved=0, dead=0)
    new = await q.reserve(1.0)
    assert new is not None and new.deliveries == 1
    await q.dead_letter(msg, "late")  # nor does a dead_letter of the old delivery
    assert await q.stats() == QueueStats(ready=0, delayed=0, reserved=1, dead=0)


async def test_order_holds_after_an_empty_reserve(queues: QueueMaker) -> None:
    # After an empty reserve Redis reads new entries of every priority at once; those past
    # the count went back to the end of their stream, behind newer ones (b after d).
    q = queues()
    assert await q.reserve_many(1, 0.0) == []
    for i, p in [("b", 0), ("d", 0), ("a", 2)]:
        await q.push(Call(i, "demo", "echo", i.encode(), priority=p))
    [first] = await q.reserve_many(1, 1.0)
    assert first.call.id == "a"
    assert await q.stats() == QueueStats(ready=2, delayed=0, reserved=1, dead=0)
    got = [m for _ in range(2) for m in await q.reserve_many(1, 1.0)]
    assert [(m.call.id, m.deliveries) for m in got] == [("b", 1), ("d", 1)]
    assert await q.stats() == QueueStats(ready=0, delayed=0, reserved=3, dead=0)
