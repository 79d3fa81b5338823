"""Model-based tests of the queue: random operations on a real backend (a fresh SQLite
file or Redis prefix per example), step by step compared with a small in-memory model
of docs/queue.md.

The model holds each live message (ready, delayed or reserved, its place in line and
its deliveries) and the dead letters. Every reserve must hand out exactly the first
ready messages by priority, then arrival (SQLite: a released or delayed message keeps
its place; Redis: it joins the end of its stream), none twice, with the deliveries
made so far + 1; after every step the stats and the dead letters agree with it. Short
delays come due while the test runs (the model waits them out around each reserve
rather than guess), long ones never do. Lapsed reservations and two consumers at once
have tests of their own, with few examples: they take real time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from config.domain import Call
from config.settings import load_settings
from mq.base import Message, MessageQueue, QueueStats, lapsed_reason, open_queue
from mq.errors import ReservationLost
from tests.mq.conftest import BACKENDS, make_url
from tests.rig import RedisServer

pytestmark = pytest.mark.integration

T = TypeVar("T")

IDS = ["a", "b", "c", "d", "e", "f"]
LONG_S = 3600.0  # never due within a test
SHORT_S = [0.05, 0.1, 0.2, 0.3]
NEAR_S = 0.1  # a delayed message due this soon after a reserve starts is waited for

delays = st.sampled_from([0.0, 0.0, 0.0, LONG_S, *SHORT_S])
prios = st.integers(0, 2)


@dataclass
class Entry:
    """The model's view of one live message."""

    id: str
    body: bytes
    prio: int
    key: tuple[int, int]  # order among ready messages: (-priority, arrival); ties allowed
    state: str  # "ready", "delayed" or "reserved"
    prior: int = 0  # deliveries made so far
    due_lo: float = 0.0  # delayed: due no earlier than this (time.time())
    due_hi: float = 0.0  # ... and no later than this
    held: Message | None = None


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coro)


class QueueModel(RuleBasedStateMachine):
    """One backend against the model. Subclasses set ``backend`` and ``url_for``."""

    backend = "sqlite"
    made = itertools.count()

    def url_for(self, n: int) -> str:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        url = self.url_for(next(self.made))
        self.q: MessageQueue = open_queue(url, load_settings())
        self.seq = itertools.count()
        self.bodies = itertools.count()
        self.live: dict[str, Entry] = {}
        self.dead: dict[str, tuple[str, int, bytes]] = {}  # id -> reason, deliveries, body
        self.dead_prio: dict[str, int] = {}
        self.stale: list[Message] = []  # deliveries already acked, released or buried

    def teardown(self) -> None:
        try:
            run(self.loop, self.q.close())
        finally:
            self.loop.close()

    # ------------------------------------------------------------ helpers
    def held(self) -> list[Entry]:
        return [e for e in self.live.values() if e.state == "reserved"]

    def ready(self) -> list[Entry]:
        return [e for e in self.live.values() if e.state == "ready"]

    def delayed(self) -> list[Entry]:
        return [e for e in self.live.values() if e.state == "delayed"]

    def place(self, e: Entry, delay_s: float, t0: float, t1: float) -> None:
        """Ready now, or delayed: due between t0 + delay and t1 + delay (ms rounding aside)."""
        if delay_s <= 0:
            e.state = "ready"
            return
        e.state = "delayed"
        e.due_lo = t0 + delay_s - 0.002 if delay_s < LONG_S else math.inf
        e.due_hi = t1 + delay_s + 0.002 if delay_s < LONG_S else math.inf

    def settle(self) -> float:
        """Wait until no delayed message comes due while a reserve runs; the time then."""
        while True:
            now = time.time()
            near = [
                e.due_hi
                for e in self.delayed()
                if now - 0.01 <= e.due_hi and e.due_lo <= now + NEAR_S
            ]
            if not near:
                return now
            time.sleep(max(near) + 0.011 - now)

    # -------------------------------------------------------------- rules
    @rule(
        items=st.lists(st.tuples(st.sampled_from(IDS), prios, delays), min_size=1, max_size=3),
        how=st.sampled_from(["push", "push_new", "push_many"]),
    )
    def push(self, items: list[tuple[str, int, float]], how: str) -> None:
        if how != "push_many":
            items = items[:1]
        calls = [
            Call(i, "demo", "echo", f"{i}-{next(self.bodies)}".encode(), priority=p, delay_s=d)
            for i, p, d in items
        ]
        seen = set(self.live)
        new = []  # one message per id: the first push of an id not live wins
        for c in calls:
            new.append(c.id not in seen)
            seen.add(c.id)
        t0 = time.time()
        c = calls[0]
        if how == "push_many":
            assert run(self.loop, self.q.push_many(calls)) == [c.id for c in calls]
        elif how == "push":
            # the keywords win over the call's own priority and delay
            other = Call(c.id, c.app, c.fn, c.body, priority=2 - c.priority, delay_s=7.0)
            got = run(self.loop, self.q.push(other, priority=c.priority, delay_s=c.delay_s))
            assert got == c.id
        else:
            got_new = run(self.loop, self.q.push_new(c, priority=c.priority, delay_s=c.delay_s))
            assert got_new is new[0], f"push_new({c.id}) said {got_new}"
        t1 = time.time()
        for c, fresh in zip(calls, new, strict=True):
            if fresh:
                e = Entry(c.id, c.body, c.priority, (-c.priority, next(self.seq)), "ready")
                self.place(e, c.delay_s, t0, t1)
                self.live[c.id] = e

    @rule(n=st.integers(1, 4), acks=st.integers(0, 3))
    def reserve(self, n: int, acks: int) -> None:
        carried = [e.held for e in self.held()[:acks] if e.held is not None]
        for m in carried:
            self.stale.append(m)
            del self.live[m.call.id]
        self.take(n, carried)

    def take(self, n: int, carried: list[Message], inbox: Sequence[Entry] = ()) -> list[Message]:
        """One reserve_many, checked against the model; returns what it handed out.

        ``inbox``: requeued messages on Redis, routed by this reserve: behind what is
        ready (handed out by the next reserve), or, when they are handed out now, before
        what this reserve promoted (a blocking read routed them, then the script ran)."""
        t0 = self.settle()
        due = [e for e in self.delayed() if e.due_hi < t0]
        expect_some = bool(self.ready() or due or inbox)
        acked: list[bool] = []
        got = run(
            self.loop,
            self.q.reserve_many(
                n, 1.0 if expect_some else 0.0, ack=carried, on_acked=lambda: acked.append(True)
            ),
        )
        if carried:
            assert acked == [True]
        t1 = time.time()
        waiting = sorted(self.delayed(), key=lambda e: e.due_hi)
        promoted = len(waiting) - run(self.loop, self.q.stats()).delayed
        # SQLite promotes what is due at every reserve. Redis may serve a reserve from its
        # blocking read alone, which promotes nothing: a delayed message may be up to
        # 250 ms late; a reserve that waited so long promotes what came due meanwhile.
        if promoted or self.backend == "sqlite":
            assert promoted >= len(due), f"{promoted} delayed messages came due, not {len(due)}"
        came = waiting[:promoted]
        assert all(e.due_lo <= t1 for e in came), f"{[e.id for e in came]} came due early"
        for e in came:
            e.state = "ready"
            if self.backend == "redis":  # a promoted message joins the end of its stream
                e.key = (-e.prio, next(self.seq))
        early = {e.id for e in inbox} & {m.call.id for m in got}
        if early:
            self.live.update((e.id, e) for e in inbox)
        self.check_batch(got, n)
        if not early:
            self.live.update((e.id, e) for e in inbox)
        return got

    def check_batch(self, got: list[Message], n: int) -> None:
        ready = sorted(self.ready(), key=lambda e: e.key)
        ids = [m.call.id for m in got]
        assert len(set(ids)) == len(ids), f"one reserve handed out {ids}"
        assert len(got) == min(n, len(ready)), (
            f"reserve_many({n}) gave {ids}, ready: {[e.id for e in ready]}"
        )
        for m in got:
            e = self.live.get(m.call.id)
            assert e is not None and e.state == "ready", f"{m.call.id} handed out, not ready"
            assert (m.call.body, m.priority, m.call.priority) == (e.body, e.prio, e.prio)
            assert m.deliveries == e.prior + 1, f"{m.call.id}: deliveries {m.deliveries}"
        keys = [self.live[i].key for i in ids]
        assert keys == sorted(keys), f"out of order: {ids}, ready: {[e.id for e in ready]}"
        rest = [e.key for e in ready if e.id not in ids]
        if keys and rest:
            assert max(keys) <= min(rest), f"{ids} taken before {[e.id for e in ready]}"
        for m in got:
            e = self.live[m.call.id]
            e.state, e.held, e.prior = "reserved", m, m.deliveries

    @rule(i=st.integers(0, 7), twice=st.booleans())
    def ack(self, i: int, twice: bool) -> None:
        if not self.held():
            return
        e = self.held()[i % len(self.held())]
        assert e.held is not None
        run(self.loop, self.q.ack(e.held))
        if twice:
            run(self.loop, self.q.ack_many([e.held]))
        self.stale.append(e.held)
        del self.live[e.id]

    @rule(i=st.integers(0, 7), delay=delays)
    def release(self, i: int, delay: float) -> None:
        if not self.held():
            return
        e = self.held()[i % len(self.held())]
        self.release_msg(e, delay)

    def release_msg(self, e: Entry, delay: float) -> None:
        assert e.held is not None
        t0 = time.time()
        run(self.loop, self.q.release(e.held, delay_s=delay))
        self.stale.append(e.held)
        e.held, e.prior = None, e.prior - 1  # no delivery charged
        if self.backend == "redis":  # Redis: to the end of its priority; SQLite keeps its place
            e.key = (-e.prio, next(self.seq))
        self.place(e, delay, t0, time.time())

    @rule(i=st.integers(0, 7))
    def extend(self, i: int) -> None:
        if not self.held():
            return
        e = self.held()[i % len(self.held())]
        assert e.held is not None
        run(self.loop, self.q.extend(e.held))

    @rule(i=st.integers(0, 30), op=st.sampled_from(["ack", "release", "extend", "dead_letter"]))
    def stale_delivery(self, i: int, op: str) -> None:
        """A delivery already acked, released or buried changes nothing (ack: the id's new
        message is another delivery; release and extend need this very delivery)."""
        if not self.stale:
            return
        m = self.stale[i % len(self.stale)]
        if op == "ack":
            run(self.loop, self.q.ack(m))
        elif op == "release":
            run(self.loop, self.q.release(m))
        elif op == "dead_letter":
            run(self.loop, self.q.dead_letter(m, "late"))
        else:
            with pytest.raises(ReservationLost):
                run(self.loop, self.q.extend(m))

    @rule(i=st.integers(0, 7), reason=st.sampled_from(["gave up", "bad input: x"]))
    def dead_letter(self, i: int, reason: str) -> None:
        if not self.held():
            return
        e = self.held()[i % len(self.held())]
        assert e.held is not None
        run(self.loop, self.q.dead_letter(e.held, reason))
        self.stale.append(e.held)
        self.dead[e.id] = (reason, e.held.deliveries, e.body)
        self.dead_prio[e.id] = e.prio
        del self.live[e.id]

    @rule(pick=st.none() | st.lists(st.sampled_from([*IDS, "zz"]), max_size=3, unique=True))
    def dead_requeue(self, pick: list[str] | None) -> None:
        if not self.dead:
            return
        names = sorted(self.dead) if pick is None else [i for i in pick if i in self.dead]
        assert run(self.loop, self.q.dead_requeue(pick)) == len(names)
        group = next(self.seq)  # requeued together: in no promised order among themselves
        back = []
        for i in names:
            _, _, body = self.dead.pop(i)
            prio = self.dead_prio.pop(i)
            if i not in self.live:  # a live message of that id wins; the dead letter goes
                back.append(Entry(i, body, prio, (-prio, group), "ready"))
        if self.backend == "sqlite":
            self.live.update((e.id, e) for e in back)
            return
        # Redis: the producers' stream, routed by the next reserve. Take everything, then
        # hand it back in the order taken.
        taken, got = [], self.take(100, [], back)
        while got:
            taken += got
            got = self.take(100, [])
        for m in taken:
            self.release_msg(self.live[m.call.id], 0.0)

    @rule(pick=st.none() | st.lists(st.sampled_from([*IDS, "zz"]), max_size=3, unique=True))
    def dead_purge(self, pick: list[str] | None) -> None:
        if not self.dead:
            return
        names = list(self.dead) if pick is None else [i for i in pick if i in self.dead]
        assert run(self.loop, self.q.dead_purge(pick)) == len(names)
        for i in names:
            del self.dead[i]

    @rule()
    def drain(self) -> None:
        """Everything held handed back, then all of it and all that is ready comes out, in
        order, once; then nothing (nothing lost, nothing twice). All of it is acked."""
        for e in self.held():
            self.release_msg(e, 0.0)
        got = self.take(100, [])
        while got:
            run(self.loop, self.q.ack_many(got))
            for m in got:
                self.stale.append(m)
                del self.live[m.call.id]
            got = self.take(100, [])

    @rule()
    def pause(self) -> None:
        """Until the next short delay is up."""
        soonest = min((e.due_hi for e in self.delayed()), default=math.inf)
        if soonest == math.inf:
            return
        time.sleep(min(max(soonest - time.time(), 0.0), 0.3))

    # --------------------------------------------------------- invariants
    @invariant()
    def counts_agree(self) -> None:
        want = QueueStats(
            ready=len(self.ready()),
            delayed=len(self.delayed()),
            reserved=len(self.held()),
            dead=len(self.dead),
        )
        assert run(self.loop, self.q.stats()) == want

    @invariant()
    def dead_letters_agree(self) -> None:
        got = {
            d.id: (d.reason, d.deliveries, d.call.body if d.call else b"")
            for d in run(self.loop, self.q.dead_list(50))
        }
        assert got == self.dead


def check_model(machine: type[QueueModel], examples: int, steps: int) -> None:
    run_state_machine_as_test(
        machine, settings=settings(max_examples=examples, stateful_step_count=steps)
    )


def test_sqlite_follows_the_model(tmp_path: Path) -> None:
    class Sqlite(QueueModel):
        backend = "sqlite"

        def url_for(self, n: int) -> str:
            return make_url("sqlite", tmp_path / str(n), None)[0]

    check_model(Sqlite, 80, 40)


def test_redis_follows_the_model(redis_server: RedisServer, tmp_path: Path) -> None:
    class Redis(QueueModel):
        backend = "redis"

        def url_for(self, n: int) -> str:
            return make_url("redis", tmp_path, redis_server)[0]

    check_model(Redis, 35, 40)


def open_on(url: str, **overrides: Any) -> MessageQueue:
    """A queue with these settings, also past their usual bounds (a short reservation)."""
    return open_queue(url, load_settings().model_copy(update=overrides))


# ------------------------------------------------------- lapsed reservations

RESERVATION_MS = 250


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4)
@given(
    max_deliveries=st.integers(1, 3),
    lapses=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    prio=prios,
)
def test_lapsed_reservations_come_back_then_die(
    backend: str,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    max_deliveries: int,
    lapses: list[int],
    prio: int,
) -> None:
    """Message i is left to lapse lapses[i] times, then acked: it comes back each time
    with deliveries + 1, until it was delivered max_deliveries times; it lapses once more
    and is buried, reported once by take_buried."""
    ids = [f"m{i}" for i in range(len(lapses))]
    buried = {i for i, n in zip(ids, lapses, strict=True) if n >= max_deliveries}

    async def main() -> None:
        url = make_url(backend, tmp_path_factory.mktemp("lapse"), redis_server)[0]
        q = open_on(url, mq_reservation_msecs=RESERVATION_MS, mq_max_deliveries=max_deliveries)
        try:
            await q.push_many([Call(i, "demo", "echo", i.encode(), priority=prio) for i in ids])
            seen = {i: 0 for i in ids}
            last: dict[str, float] = {}
            told: list[tuple[str, str]] = []
            deadline = time.monotonic() + 10

            def pending() -> list[str]:  # still to be delivered (again)
                want = {i: min(n + 1, max_deliveries) for i, n in zip(ids, lapses, strict=True)}
                return [i for i in ids if seen[i] < want[i]]

            while pending():
                assert time.monotonic() < deadline, f"stuck: {seen}"
                for m in await q.reserve_many(5, 2.0):
                    i = m.call.id
                    now = time.monotonic()
                    # never handed out again while its reservation holds
                    assert i not in last or now - last[i] >= RESERVATION_MS / 1000 - 0.02
                    last[i] = now
                    seen[i] += 1
                    assert m.deliveries == seen[i] <= max_deliveries
                    if seen[i] > lapses[ids.index(i)]:
                        await q.ack(m)
                told += [(b.call_id, b.reason) for b in q.take_buried()]
            while len(told) < len(buried):  # the last burials
                assert time.monotonic() < deadline, f"not buried: {buried}, told {told}"
                assert await q.reserve_many(5, 2.0) == []
                told += [(b.call_id, b.reason) for b in q.take_buried()]
            reason = lapsed_reason(max_deliveries)
            assert sorted(told) == sorted((i, reason) for i in buried)
            dead = {d.id: (d.reason, d.deliveries) for d in await q.dead_list()}
            assert dead == {i: (reason, max_deliveries) for i in buried}
            assert await q.stats() == QueueStats(0, 0, 0, len(buried))
            assert seen == {i: min(n + 1, max_deliveries) for i, n in zip(ids, lapses, strict=True)}
        finally:
            await q.close()

    asyncio.run(main())


# ------------------------------------------------------------ two consumers


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25)
@given(
    prios=st.lists(prios, min_size=1, max_size=30),
    batches=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    releases=st.lists(st.booleans(), max_size=40),
)
def test_two_consumers_never_hold_one_message(
    backend: str,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    prios: list[int],
    batches: tuple[int, int],
    releases: list[bool],
) -> None:
    """Two queue objects reserve, release and ack at once: no message is held by both at
    any moment, and each is acked exactly once."""
    ids = [f"c{n}" for n in range(len(prios))]

    async def main() -> None:
        url = make_url(backend, tmp_path_factory.mktemp("two"), redis_server)[0]
        queues = [open_on(url), open_on(url)]
        held: dict[str, int] = {}  # message id -> the consumer holding it
        acked: list[str] = []
        fates = iter(releases)  # release (True) or ack, while they last; then ack

        async def consume(who: int) -> None:
            q = queues[who]
            while len(acked) < len(ids):
                for m in await q.reserve_many(batches[who], 0.05):
                    i = m.call.id
                    assert i not in held, f"{i}: consumer {who} got it, {held[i]} holds it"
                    assert m.deliveries == 1
                    held[i] = who
                    await asyncio.sleep(0)  # the other consumer runs meanwhile
                    del held[i]  # before the round trip: the other may have it after it
                    if next(fates, False):
                        await q.release(m)
                    else:
                        acked.append(i)
                        await q.ack(m)

        try:
            await queues[0].push_many(
                [Call(i, "demo", "echo", b"", priority=p) for i, p in zip(ids, prios, strict=True)]
            )
            async with asyncio.timeout(20):
                await asyncio.gather(consume(0), consume(1))
            assert sorted(acked) == sorted(ids)
            assert await queues[1].stats() == QueueStats(0, 0, 0, 0)
        finally:
            for q in queues:
                await q.close()

    asyncio.run(main())
