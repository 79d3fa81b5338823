"""Redis only: the one-command wire format, the producer API, durability across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import mq
from config.domain import Call, new_call_id
from config.settings import load_settings
from mq import redis as redis_queue
from mq.base import Message, MessageQueue, QueueStats, open_queue
from mq.errors import QueueError, QueueUnavailable
from mq.producer import enqueue, enqueue_async
from tests.rig import RedisServer, impostor

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server, so the documented default prefix ``fnq`` is ours alone."""
    server = RedisServer(tmp_path, appendonly=True).start()
    yield server
    server.stop()


def test_the_lapsed_reason_is_spelt_once() -> None:
    """reserve.lua is passed mq.base.LAPSED_REASON: no script keeps a copy of its text."""
    scripts = sorted(Path(mq.__file__).with_name("lua").glob("*.lua"))
    assert "reserve.lua" in [p.name for p in scripts]
    assert [p.name for p in scripts if "lapsed each time" in p.read_text()] == []


def redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return done.stdout.strip()


async def test_documented_redis_cli_command(own_redis: RedisServer) -> None:
    q = open_queue(own_redis.url, load_settings())
    try:
        # exactly as in docs/queue.md
        redis_cli(
            own_redis.port, "XADD", "fnq:calls", "*", "app", "demo", "fn", "echo", "body", "hello"
        )
        msg = await q.reserve(5.0)
        assert msg is not None
        assert (msg.call.app, msg.call.fn, msg.call.body) == ("demo", "echo", b"hello")
        assert len(msg.call.id) == 26 and msg.deliveries == 1 and msg.priority == 0
        await q.ack(msg)

        redis_cli(
            own_redis.port,
            "XADD",
            "fnq:calls",
            "*",
            "app",
            "demo",
            "fn",
            "echo",
            "body",
            "hi",
            "id",
            "order-7",
            "priority",
            "2",
            "delay",
            "0.5",
            "headers",
            '{"Content-Type":"text/plain"}',
        )
        redis_cli(
            own_redis.port, "XADD", "fnq:calls", "*", "app", "demo", "fn", "echo", "id", "order-7"
        )  # the same id again: dropped
        t0 = time.monotonic()
        msg = await q.reserve(5.0)
        assert msg is not None and msg.call.id == "order-7"
        assert time.monotonic() - t0 >= 0.4
        assert msg.priority == 2 and msg.call.body == b"hi"
        assert dict(msg.call.headers) == {"Content-Type": "text/plain"}
        await q.ack(msg)
        assert await q.reserve(0.3) is None
    finally:
        await q.close()


async def test_producer_api_sync_and_async(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?prefix=prod"
    q = open_queue(url, load_settings())
    sync_client = redis.Redis(port=redis_server.port, socket_timeout=5)
    async_client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        first = enqueue(sync_client, "demo", "echo", "hello", headers={"X-A": "1"}, prefix="prod")
        second = await enqueue_async(
            async_client, "demo", "echo", b"\x00\xff", priority=1, call_id="given-id", prefix="prod"
        )
        assert second == "given-id"
        with pytest.raises(ValueError, match="priority"):
            enqueue(sync_client, "demo", "echo", priority=5, prefix="prod")
        with pytest.raises(ValueError, match="exceeds"):
            enqueue(sync_client, "demo", "echo", b"x" * 11, max_body_bytes=10, prefix="prod")
        got: list[Message] = []
        while len(got) < 2:
            got += await q.reserve_many(10, 5.0)
        by_id = {m.call.id: m for m in got}
        assert by_id[first].call.body == b"hello"
        assert dict(by_id[first].call.headers) == {"X-A": "1"}
        assert by_id[second].call.body == b"\x00\xff" and by_id[second].priority == 1
        await q.ack_many(got)
    finally:
        sync_client.close()
        await async_client.aclose()
        await q.close()


async def test_a_producer_whose_clock_is_an_hour_behind_makes_calls_created_by_redis_clock(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer's host reads its clock an hour behind: its calls are not an hour
    old when a worker takes them (their creation time is Redis's, when it adds them)."""
    url = f"{redis_server.url}?prefix=behind"
    q = open_queue(url, load_settings())
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        before_s = client.time()[0]
        real_ns = time.time_ns
        with monkeypatch.context() as patched:
            patched.setattr(time, "time_ns", lambda: real_ns() - 3600 * 10**9)
            call_id = enqueue(client, "demo", "echo", "hi", prefix="behind")
        [msg] = await q.reserve_many(1, 5.0)
        assert msg.call.id == call_id
        made_s = msg.call.created_at.timestamp()
        assert before_s <= made_s <= client.time()[0] + 1
        await q.ack(msg)
    finally:
        client.close()
        await q.close()


async def test_push_new_and_producers_entries_of_the_same_id(redis_server: RedisServer) -> None:
    q = open_queue(f"{redis_server.url}?prefix=dup", load_settings())
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    fields = {"app": "demo", "fn": "echo", "body": "first"}
    try:
        # An entry no consumer has routed yet is not seen by a push: the push's
        # message takes the id, and the entry is dropped once it is routed.
        client.xadd("dup:calls", {**fields, "id": "dup-1"})
        assert await q.push_new(Call("dup-1", "demo", "echo", b"second")) is True
        msg = await q.reserve(2.0)
        assert msg is not None and msg.call.body == b"second"
        assert await q.reserve(0.2) is None  # routed now: a duplicate, dropped
        assert client.xlen("dup:calls") == 0
        await q.ack(msg)
        # A routed entry is seen, a delayed one too.
        client.xadd("dup:calls", {**fields, "id": "dup-2", "delay": "30"})
        assert await q.reserve(0.2) is None
        assert await q.push_new(Call("dup-2", "demo", "echo", b"second")) is False
        assert await q.stats() == QueueStats(ready=0, delayed=1, reserved=0, dead=0)
    finally:
        client.close()
        await q.close()


async def test_entries_with_bytes_that_are_not_utf8_are_dead_letters(
    redis_server: RedisServer,
) -> None:
    """Not UTF-8 in the id or in a field's name: a dead letter with the reason, listed
    like any other; the consumer goes on (the id once stopped it while routing)."""
    q = open_queue(f"{redis_server.url}?prefix=nonutf", load_settings())
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        eid = client.xadd("nonutf:calls", {"app": "demo", "fn": "echo", "id": b"a\xff"})
        client.xadd("nonutf:calls", {"app": "demo", "fn": "echo", "id": "b", b"b\xffody": "x"})
        client.xadd("nonutf:calls", {"app": "demo", "fn": "echo", "id": "good"})
        msg = await q.reserve(2.0)
        assert msg is not None and msg.call.id == "good"
        await q.ack(msg)
        dead = await q.dead_list()
        assert [(d.id, d.reason) for d in dead] == [
            (f"inbox-{eid.decode()}", "malformed message: field 'id' is not UTF-8 text"),
            ("b", "malformed message: unknown field(s) 'b\ufffdody'"),
        ]
        assert json.loads(dead[1].raw)["b\ufffdody"] == "x"
    finally:
        client.close()
        await q.close()


async def test_an_entry_that_repeats_a_field_is_a_dead_letter(redis_server: RedisServer) -> None:
    """A stream entry may hold a field twice (``XADD ... id a id b``): which value was
    meant cannot be told, so the entry is malformed, not taken with the last one."""
    q = open_queue(f"{redis_server.url}?prefix=twice", load_settings())
    try:
        redis_cli(redis_server.port, "XADD", "twice:calls", "*", "app", "demo", "fn", "echo",
                  "id", "first", "body", "a", "id", "second")  # fmt: skip
        redis_cli(redis_server.port, "XADD", "twice:calls", "*", "app", "demo", "fn", "echo",
                  "body", "a", "body", "b")  # fmt: skip
        redis_cli(redis_server.port, "XADD", "twice:calls", "*", "app", "demo", "fn", "echo",
                  "id", "good")  # fmt: skip
        msg = await q.reserve(2.0)
        assert msg is not None and msg.call.id == "good"
        await q.ack(msg)
        assert await q.reserve(0.1) is None
        dead = await q.dead_list()
        assert [d.reason for d in dead] == [
            "malformed message: field 'id' is given more than once",
            "malformed message: field 'body' is given more than once",
        ]
        assert dead[0].id == "second"
        assert q.take_buried() == []  # producers' entries, never routed
    finally:
        await q.close()


async def test_queued_messages_survive_a_restart(own_redis: RedisServer) -> None:
    settings = load_settings(mq_reservation_msecs=1000)
    q = open_queue(own_redis.url, settings)
    sent = await q.push_many([Call(new_call_id(), "demo", "echo", b"%d" % i) for i in range(6)])
    held = await q.reserve_many(2, 1.0)
    assert len(held) == 2
    late = await q.push(Call(new_call_id(), "demo", "echo", b"late"), delay_s=0.5)
    await q.close()
    own_redis.restart()

    q = open_queue(own_redis.url, settings)
    try:
        got: dict[str, int] = {}
        deadline = time.monotonic() + 10
        while len(got) < 7 and time.monotonic() < deadline:
            for msg in await q.reserve_many(10, 2.0):
                got[msg.call.id] = msg.deliveries
                await q.ack(msg)
        assert set(got) == {*sent, late}
        assert {cid for cid, d in got.items() if d == 2} == {m.call.id for m in held}
    finally:
        await q.close()


async def test_unreachable_server_is_a_retryable_error(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    q = open_queue(f"{server.url}?timeout_s=2", load_settings())
    try:
        with pytest.raises(QueueUnavailable):
            await q.reserve(0.1)
        with pytest.raises(QueueUnavailable):
            await q.push(Call(new_call_id(), "demo", "echo"))
    finally:
        await q.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "the server there does not speak Redis"),
        (None, "no answer within 1 s"),
    ],
)
async def test_a_server_that_answers_not_as_redis_is_unavailable_in_words(
    answer: bytes | None, reason: str
) -> None:
    """Another service on the port, or one that never answers: QueueUnavailable with a
    reason (`fnq status` and `fnq call` print it in one line), not redis-py's error."""
    async with impostor(answer) as port:
        q = open_queue(f"redis://127.0.0.1:{port}/0?timeout_s=1", load_settings())
        try:
            with pytest.raises(QueueUnavailable, match=f"^redis queue: {reason}"):
                await q.stats()
            with pytest.raises(QueueUnavailable, match=f"^redis queue: {reason}"):
                await q.dead_list(10)
            with pytest.raises(QueueUnavailable, match=f"^redis queue: {reason}"):
                await q.push(Call(new_call_id(), "demo", "echo"))
        finally:
            await q.close()


async def test_a_burst_of_pushes_on_a_new_queue_object(redis_server: RedisServer) -> None:
    """The first commands of a queue object make the consumer groups: a burst of
    tasks pushing at once makes them once, not once per task, each through one of
    redis-py's connections (past its max_connections, most pushes failed)."""
    q = open_queue(f"{redis_server.url}?prefix=burst&max_connections=4", load_settings())
    try:
        calls = [Call(new_call_id(), "demo", "echo", b"%d" % i) for i in range(40)]
        assert await asyncio.gather(*(q.push_new(c) for c in calls)) == [True] * 40
        assert (await q.stats()).ready == 40
    finally:
        await q.close()


async def test_prefixes_are_separate_queues(redis_server: RedisServer) -> None:
    a = open_queue(f"{redis_server.url}?prefix=sep-a", load_settings())
    b = open_queue(f"{redis_server.url}?prefix=sep-b", load_settings())
    try:
        await a.push(Call(new_call_id(), "demo", "echo"))
        assert await b.reserve(0.2) is None
        msg = await a.reserve(1.0)
        assert msg is not None
        await a.ack(msg)
    finally:
        await a.close()
        await b.close()


async def test_entry_of_a_consumer_that_died_while_routing_is_routed(
    redis_server: RedisServer,
) -> None:
    url = f"{redis_server.url}?prefix=ghost"
    q = open_queue(url, load_settings(mq_reservation_msecs=1000))
    client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        await q.stats()  # makes the consumer groups
        await client.xadd("ghost:calls", {"app": "demo", "fn": "echo", "id": "orphan"})
        # a consumer reads the producers' entry and dies before routing it
        await client.xreadgroup("fnq", "ghost-consumer", {"ghost:calls": ">"}, count=10)
        t0 = time.monotonic()
        msg = await q.reserve(5.0)
        assert msg is not None and msg.call.id == "orphan"
        assert time.monotonic() - t0 >= 0.5
        await q.ack(msg)
    finally:
        await client.aclose()
        await q.close()


def script_calls(port: int) -> int:
    stats = redis_cli(port, "INFO", "commandstats")
    for line in stats.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@contextlib.asynccontextmanager
async def consumer_and_producer(url: str) -> AsyncIterator[tuple[MessageQueue, MessageQueue]]:
    consumer = open_queue(url, load_settings())
    producer = open_queue(url, load_settings())
    try:
        yield consumer, producer
    finally:
        await consumer.close()
        await producer.close()


async def test_a_waiting_reserve_takes_a_new_entry_in_the_same_round_trip(
    own_redis: RedisServer,
) -> None:
    async with consumer_and_producer(own_redis.url) as (consumer, producer):
        await producer.push(Call(new_call_id(), "demo", "echo", b"warm"))  # scripts loaded
        warm = await consumer.reserve(1.0)
        assert warm is not None
        await consumer.ack(warm)
        waiting = asyncio.create_task(consumer.reserve_many(5, 10.0))
        await asyncio.sleep(0.3)
        before = script_calls(own_redis.port)
        pushed = Call(new_call_id(), "demo", "echo", b"x", priority=1)
        await producer.push(pushed)
        msgs = await asyncio.wait_for(waiting, 10.0)
        # One script for the push; the waiting consumer ran none to take the entry.
        assert script_calls(own_redis.port) - before == 1
        assert [(m.call.id, m.deliveries, m.priority) for m in msgs] == [(pushed.id, 1, 1)]
        await consumer.ack_many(msgs)
        assert await consumer.reserve(0.1) is None


async def test_acks_ride_on_the_reserve_script(own_redis: RedisServer) -> None:
    q = open_queue(own_redis.url, load_settings())
    try:
        ids = [await q.push(Call(new_call_id(), "demo", "echo", b"x")) for _ in range(3)]
        held = await q.reserve_many(2, 1.0)
        before = script_calls(own_redis.port)
        more = await q.reserve_many(2, 1.0, ack=held)
        assert script_calls(own_redis.port) - before == 1  # one round trip for both
        assert [m.call.id for m in more] == ids[2:]
        stats = await q.stats()
        assert (stats.ready, stats.reserved) == (0, 1)
        length = sum(int(redis_cli(own_redis.port, "XLEN", f"fnq:ready:{p}")) for p in range(3))
        assert length == 1  # the acked entries are gone from their stream
    finally:
        await q.close()


async def test_reserves_right_after_an_empty_one_skip_the_script(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls arriving one at a time: after a reserve script that found nothing due, the
    # next reserves go straight to a blocking read, their acks in the same round trip.
    monkeypatch.setattr(redis_queue, "QUIET_MAX_S", 1.0)  # room for a slow host
    consumer = open_queue(own_redis.url, load_settings())
    producer = open_queue(own_redis.url, load_settings())
    claims = 0
    claim = consumer._claim  # type: ignore[attr-defined]

    async def counted(*args: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim(*args)

    consumer._claim = counted  # type: ignore[attr-defined]
    try:
        await producer.push(Call(new_call_id(), "demo", "echo", b"warm"))  # scripts loaded
        warm = await consumer.reserve_many(2, 1.0)
        await consumer.ack_many(warm)
        assert await consumer.reserve_many(2, 0.02) == []  # the script found nothing due
        claims = 0
        first = Call(new_call_id(), "demo", "echo", b"1")
        await producer.push(first)
        got = await consumer.reserve_many(2, 1.0)
        assert [m.call.id for m in got] == [first.id]
        # The next one acks the first; the ack is done before the read waits.
        acked = asyncio.Event()
        waiting = asyncio.create_task(consumer.reserve_many(2, 1.0, ack=got, on_acked=acked.set))
        await asyncio.wait_for(acked.wait(), 1.0)
        assert not waiting.done()
        assert (await consumer.stats()).reserved == 0
        second = Call(new_call_id(), "demo", "echo", b"2")
        await producer.push(second)
        more = await asyncio.wait_for(waiting, 1.0)
        assert [m.call.id for m in more] == [second.id]
        assert claims == 0  # no reserve script for either
        await consumer.ack_many(more)
        # Once the quiet time is over, the script runs again (sweeps, due entries).
        await asyncio.sleep(redis_queue.QUIET_MAX_S)
        assert await consumer.reserve_many(2, 0.02) == []
        assert claims >= 1
    finally:
        await consumer.close()
        await producer.close()


def counting_claims(q: MessageQueue) -> list[int]:
    """Counts the reserve scripts ``q`` runs (its ``_claim``) in the list's one item."""
    claims = [0]
    claim = q._claim  # type: ignore[attr-defined]

    async def counted(*args: Any) -> Any:
        claims[0] += 1
        return await claim(*args)

    q._claim = counted  # type: ignore[attr-defined]
    return claims


async def quieted(consumer: MessageQueue, producer: MessageQueue) -> None:
    """Scripts loaded, and ``consumer`` in its quiet time: its next reserve blocks."""
    await producer.push(Call(new_call_id(), "demo", "echo", b"warm"))
    await consumer.ack_many(await consumer.reserve_many(2, 1.0))
    assert await consumer.reserve_many(2, 0.02) == []  # found nothing due: quiet from now on


async def test_a_waiting_reserve_routes_and_takes_a_producers_entry_in_one_script(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer's XADD wakes a consumer blocked on the streams: the consumer validates
    # the entry, routes it and takes it with one script, not a reserve script after it.
    monkeypatch.setattr(redis_queue, "QUIET_MAX_S", 2.0)  # room for a slow host
    async with consumer_and_producer(own_redis.url) as (consumer, producer):
        await quieted(consumer, producer)
        claims = counting_claims(consumer)
        waiting = asyncio.create_task(consumer.reserve_many(2, 5.0))
        await asyncio.sleep(0.2)
        before = script_calls(own_redis.port)
        entry = ["app", "demo", "fn", "echo", "body", "one", "id", "one"]
        redis_cli(own_redis.port, "XADD", "fnq:calls", "*", *entry)
        msgs = await asyncio.wait_for(waiting, 5.0)
        assert [(m.call.id, m.call.body, m.deliveries) for m in msgs] == [("one", b"one", 1)]
        assert script_calls(own_redis.port) - before == 1  # the route, which took it too
        assert claims[0] == 0
        stats = await consumer.stats()
        assert (stats.ready, stats.reserved) == (0, 1)
        await consumer.ack_many(msgs)
        assert (await consumer.stats()).reserved == 0
        assert int(redis_cli(own_redis.port, "XLEN", "fnq:calls")) == 0


async def test_a_reserve_cancelled_while_it_routes_hands_the_calls_back_at_once(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_queue, "QUIET_MAX_S", 2.0)  # room for a slow host
    async with consumer_and_producer(own_redis.url) as (consumer, producer):
        await quieted(consumer, producer)
        link = consumer._link  # type: ignore[attr-defined]
        evaluate = link.eval
        routing, go_on = asyncio.Event(), asyncio.Event()

        async def held(name: str, args: list[Any]) -> Any:
            if name == "enqueue":
                routing.set()
                await go_on.wait()
            return await evaluate(name, args)

        link.eval = held
        waiting = asyncio.create_task(consumer.reserve_many(2, 5.0))
        await asyncio.sleep(0.2)
        redis_cli(own_redis.port, "XADD", "fnq:calls", "*", "app", "demo", "fn", "echo", "id", "c")
        await asyncio.wait_for(routing.wait(), 5.0)
        waiting.cancel()  # a stop request while the route is on its way
        await asyncio.sleep(0.05)
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        link.eval = evaluate
        stats = await producer.stats()
        assert (stats.ready, stats.reserved) == (1, 0)  # back in line, not held till it lapses
        [msg] = await producer.reserve_many(2, 1.0)
        assert (msg.call.id, msg.deliveries) == ("c", 1)
        await producer.ack(msg)


async def test_producers_entries_found_by_the_reserve_script_are_taken_by_priority(
    own_redis: RedisServer,
) -> None:
    q = open_queue(own_redis.url, load_settings())
    try:
        await q.push(Call("warm", "demo", "echo", b"w"))
        await q.ack_many(await q.reserve_many(1, 1.0))  # the scripts are loaded, not quiet
        await q.push(Call("queued", "demo", "echo", b"q"))
        for cid, prio in (("low", "0"), ("high", "2"), ("delayed", "0")):
            args = ["app", "demo", "fn", "echo", "id", cid, "priority", prio]
            if cid == "delayed":
                args += ["delay", "60"]
            redis_cli(own_redis.port, "XADD", "fnq:calls", "*", *args)
        duplicate = ["app", "demo", "fn", "echo", "id", "queued"]  # dropped when routed
        redis_cli(own_redis.port, "XADD", "fnq:calls", "*", *duplicate)
        claims = counting_claims(q)
        before = script_calls(own_redis.port)
        msgs = await q.reserve_many(3, 1.0)
        # One reserve script (it found "queued" and read the producers' entries), one
        # route that took two more: the high priority one first.
        assert [m.call.id for m in msgs] == ["queued", "high", "low"]
        assert (claims[0], script_calls(own_redis.port) - before) == (1, 2)
        assert await q.reserve_many(3, 0.2) == []
        stats = await q.stats()
        assert (stats.ready, stats.delayed, stats.reserved) == (0, 1, 3)
        await q.ack_many(msgs)
    finally:
        await q.close()


async def test_a_delayed_call_comes_at_most_the_quiet_time_late(own_redis: RedisServer) -> None:
    q = open_queue(own_redis.url, load_settings())
    try:
        assert await q.reserve_many(2, 0.02) == []  # quiet from now on: nothing was due
        delayed = Call(new_call_id(), "demo", "echo", b"later")
        await q.push(delayed, delay_s=0.1)
        t0 = time.monotonic()
        got = await q.reserve_many(2, 2.0)
        waited = time.monotonic() - t0
        assert [m.call.id for m in got] == [delayed.id]
        assert waited < redis_queue.QUIET_MAX_S + 0.5, waited  # the reserve waits up to 2 s
    finally:
        await q.close()


async def test_a_delayed_push_wakes_a_consumer_waiting_on_an_empty_queue(
    own_redis: RedisServer,
) -> None:
    async with consumer_and_producer(own_redis.url) as (consumer, producer):
        assert await consumer.reserve_many(2, 0.02) == []  # nothing due: it may wait long
        waiting = asyncio.create_task(consumer.reserve_many(2, 20.0))
        await asyncio.sleep(0.3)
        delayed = [Call(new_call_id(), "demo", "echo", b"soon") for _ in range(2)]
        t0 = time.monotonic()
        await producer.push(delayed[0], delay_s=0.5)
        await producer.push(delayed[1], delay_s=0.5)
        got = await asyncio.wait_for(waiting, 20.0)
        waited = time.monotonic() - t0
        assert {m.call.id for m in got} <= {c.id for c in delayed} and got
        assert 0.4 < waited < 0.5 + redis_queue.QUIET_MAX_S, waited
        rest = await consumer.reserve_many(2, 2.0) if len(got) < 2 else []
        assert {m.call.id for m in [*got, *rest]} == {c.id for c in delayed}
        # the wake-up entry is gone, and was neither delivered nor buried
        stats = await consumer.stats()
        assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 2, 0)


async def test_delayed_pushes_nobody_reads_leave_one_uncounted_wake_up_entry(
    own_redis: RedisServer,
) -> None:
    q = open_queue(own_redis.url, load_settings())
    client = redis.Redis(port=own_redis.port, socket_timeout=5)
    try:
        for _ in range(3):
            await q.push(Call(new_call_id(), "demo", "echo", b"later"), delay_s=30)
        assert client.xlen("fnq:calls") == 1
        assert await q.stats() == QueueStats(ready=0, delayed=3, reserved=0, dead=0)
        # a producer's entry in between: still one wake-up entry, and only the call counts
        client.xadd("fnq:calls", {"app": "demo", "fn": "echo", "id": "between"})
        await q.push(Call(new_call_id(), "demo", "echo", b"later"), delay_s=30)
        assert client.xlen("fnq:calls") == 2
        assert await q.stats() == QueueStats(ready=1, delayed=4, reserved=0, dead=0)
        msg = await q.reserve(1.0)  # routes both: the wake-up entry is dropped
        assert msg is not None and msg.call.id == "between"
        assert client.xlen("fnq:calls") == 0
        assert await q.stats() == QueueStats(ready=0, delayed=4, reserved=1, dead=0)
        await q.push(Call(new_call_id(), "demo", "echo", b"later"), delay_s=30)
        assert client.xlen("fnq:calls") == 1  # a new one, since the last is gone
        assert await q.stats() == QueueStats(ready=0, delayed=5, reserved=1, dead=0)
    finally:
        client.close()
        await q.close()


async def test_scripts_the_server_lost_are_loaded_again(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restarted (or flushed) server has no scripts: each is loaded again when
    # first needed, also the ack sent ahead of a blocking read.
    monkeypatch.setattr(redis_queue, "QUIET_MAX_S", 5.0)  # the read below is without script
    q = open_queue(own_redis.url, load_settings())
    try:
        first = await q.push(Call(new_call_id(), "demo", "echo", b"a"))
        held = await q.reserve_many(2, 1.0)
        assert [m.call.id for m in held] == [first]
        assert await q.reserve_many(2, 0.02) == []  # nothing due: quiet from now on
        redis_cli(own_redis.port, "SCRIPT", "FLUSH")
        second = await q.push(Call(new_call_id(), "demo", "echo", b"b"))
        acked: list[bool] = []
        got = await q.reserve_many(2, 1.0, ack=held, on_acked=lambda: acked.append(True))
        assert [m.call.id for m in got] == [second] and acked == [True]
        assert (await q.stats()).reserved == 1  # the first is acked, the second held
        redis_cli(own_redis.port, "SCRIPT", "FLUSH")
        await q.ack_many(got)
        assert await q.stats() == QueueStats(0, 0, 0, 0)
    finally:
        await q.close()


async def test_after_a_failed_read_without_the_script_the_script_runs(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The keys vanish under a consumer between calls (FLUSHDB): its quick read fails,
    # and the next reserve runs the script, which makes the consumer group again.
    monkeypatch.setattr(redis_queue, "QUIET_MAX_S", 5.0)
    q = open_queue(own_redis.url, load_settings())
    try:
        assert await q.reserve_many(2, 0.02) == []  # quiet from now on
        redis_cli(own_redis.port, "FLUSHDB")
        with pytest.raises(QueueError, match="NOGROUP"):
            await q.reserve_many(2, 0.5)
        call = Call(new_call_id(), "demo", "echo", b"after")
        await q.push(call)
        got = await q.reserve_many(2, 1.0)
        assert [m.call.id for m in got] == [call.id]
    finally:
        await q.close()
