"""Model-based tests of the RQ bridge: random rq-side operations (rq's own enqueue,
enqueue_at, enqueue_in, at_front, cancel, delete; good and malformed jobs, JSON and
pickled) and fnq-side ones (push_new, reserve_many with acks carried, complete, ack,
release, extend, dead_letter, the dead letters, lapsed reservations) on a real
redis-server, step by step compared with a small model of docs/rq.md.

The model holds each job's rq status, its place on its queue, fnq's reservation of it
(the delivery holding it, lapsed or not, or a ghost: its job deleted, maybe made anew)
and its delivery count. Every reserve must hand out exactly the jobs the model says, in
order, each once, with the deliveries made so far + 1, and fail the malformed and too
often lapsed ones with their reason. After every step rq itself (Job.fetch().get_status(),
its registries, the queues' lists), fnq's stats, receipts and dead letters agree with
the model, and no queued job is off its queue. Short delays come due while the test
runs (the model waits them out around each reserve rather than guess); long ones never
do. A lapse is made by moving reservations' expiries into the past, as time would; a
test of its own lets short reservations lapse in real time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
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

from config.domain import Call, CallStatus, Outcome, Response
from config.settings import load_settings
from mq.base import Message, QueueStats
from mq.errors import ReservationLost
from mq.rq import RECEIPTS_KEY, RESERVED_KEY, RQQueue
from tests.rig import RedisServer

pytestmark = pytest.mark.integration

T = TypeVar("T")

DB = 8  # the other RQ tests use 7
QUEUES = ["high", "default"]  # taken in this order
IDS = ["j0", "j1", "j2", "j3", "j4", "j5"]
RESERVATION_MS = 60_000  # lapses are made by the lapse rule
MAX_DELIVERIES = 2
LONG_S = 3600.0  # never due within a test
SHORT_S = 0.15
NEAR_S = 0.15  # a scheduled job due this soon after a reserve starts is waited for
LIVE = {"queued", "scheduled", "started"}


@dataclass(frozen=True)
class Shape:
    """How a producer enqueues ``fnq.call``: the call it asks for, or why fnq refuses it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # a fragment of the reason
    pickled: bool = False


SHAPES = [
    Shape(("fnq.call",), {"app": "demo", "fn": "echo", "body": "hi"}, b"hi"),
    Shape(("fnq.call", "demo", "echo", "pos"), {}, b"pos"),
    Shape(
        ("fnq.call",),
        {"app": "demo", "fn": "echo", "body": {"n": 1}},
        b'{"n":1}',
        {"Content-Type": "application/json"},
    ),
    Shape(("fnq.call",), {"app": "demo", "fn": "echo", "body_b64": "AAE="}, b"\x00\x01"),
    Shape(("fnq.call", "demo"), {"fn": "echo", "headers": {"X-A": "1"}}, b"", {"X-A": "1"}),
    Shape(("os.system", "true"), {}, refused="fnq runs only 'fnq.call'"),
    Shape(("fnq.call",), {"app": "demo"}, refused="needs fn="),
    Shape(("fnq.call",), {"app": "demo", "fn": "echo", "bdy": "x"}, refused="unknown keyword"),
    Shape(("fnq.call",), {"app": "demo", "fn": "echo", "headers": {"X": 1}}, refused="'X'"),
    Shape(("fnq.call",), {"app": "demo", "fn": "echo", "body_b64": "!!"}, refused="base64"),
    Shape(("fnq.call", "demo", "echo"), {"fn": "echo"}, refused="both by position"),
    Shape(("fnq.call",), {"app": "demo", "fn": "echo"}, refused="pickled", pickled=True),
]


shapes = st.sampled_from(SHAPES[:5]) | st.sampled_from(SHAPES[5:])  # good ones half the time


@dataclass
class J:
    """The model's view of one rq job."""

    id: str
    queue: str
    shape: Shape
    status: str  # rq's: queued, scheduled, started, finished, failed, canceled
    prior: int = 0  # deliveries made so far (fnq_deliveries)
    due: float = math.inf  # scheduled: its score in rq's ScheduledJobRegistry
    reason: str | None = None  # failed: a fragment of its failure text
    gen: int = 0  # which job of this id (rq may delete one and make another)


@dataclass
class Hold:
    """One fnq reservation: the delivery holding it; its job may be gone meanwhile."""

    msg: Message
    queue: str
    gen: int  # of the job it was handed out for
    lapsed: bool = False


def run(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return loop.run_until_complete(coro)


def ok() -> Outcome:
    return Outcome(CallStatus.SUCCESS, response=Response(200, {}, b"done"))


class RQModel(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.conn = Redis.from_url(self.url)
        self.conn.flushdb()
        overrides = {"mq_reservation_msecs": RESERVATION_MS, "mq_max_deliveries": MAX_DELIVERIES}
        self.q = RQQueue.from_url(self.url, QUEUES, load_settings().model_copy(update=overrides))
        self.producers = {n: Queue(n, connection=self.conn, serializer="json") for n in QUEUES}
        self.picklers = {n: Queue(n, connection=self.conn) for n in QUEUES}
        self.jobs: dict[str, J] = {}
        self.lists: dict[str, list[str]] = {n: [] for n in QUEUES}
        self.holds: dict[str, Hold] = {}  # job id -> its reservation
        self.lapse_order: list[str] = []  # the order their sweep takes lapsed reservations
        self.expiries = itertools.count(1)  # long past (ms)
        self.stale: list[tuple[Message, int]] = []  # deliveries ended, and their job's gen
        self.gens = itertools.count(1)

    def teardown(self) -> None:
        try:
            run(self.loop, self.q.close())
        finally:
            self.loop.close()
            self.conn.close()

    # ------------------------------------------------------------ helpers
    def fail(self, j: J, reason: str) -> None:
        j.status, j.reason = "failed", reason

    def unlist(self, jid: str) -> None:
        for ids in self.lists.values():
            while jid in ids:
                ids.remove(jid)

    def settle(self) -> float:
        """Wait until no scheduled job comes due while a reserve runs; the time then."""
        while True:
            now = time.time()
            near = [
                j.due for j in self.jobs.values()
                if j.status == "scheduled" and now - 0.02 <= j.due <= now + NEAR_S
            ]  # fmt: skip
            if not near:
                return now
            time.sleep(max(near) + 0.021 - now)

    def ghost(self, h: Hold) -> bool:
        """The job this reservation was handed out for is gone (deleted, maybe made anew)."""
        j = self.jobs.get(h.msg.call.id)
        return j is None or j.gen != h.gen

    def fresh(self, jid: str) -> bool:
        j = self.jobs.get(jid)
        held = self.holds.get(jid)
        return j is not None and j.status == "queued" and (held is None or self.ghost(held))

    def drop(self, h: Hold) -> J | None:
        """The reservation ends; the job it still stands for, if any."""
        del self.holds[h.msg.call.id]
        self.stale.append((h.msg, h.gen))
        return None if self.ghost(h) else self.jobs[h.msg.call.id]

    def held(self) -> list[Hold]:
        return [self.holds[i] for i in sorted(self.holds)]

    # --------------------------------------------------------- rq's side
    @initialize(items=st.lists(st.tuples(st.sampled_from(QUEUES), shapes), min_size=1, max_size=5))
    def produce(self, items: list[tuple[str, Shape]]) -> None:
        for jid, (queue, shape) in zip(IDS, items, strict=False):
            self.enqueue(jid, queue, shape, "enqueue")

    @rule(
        jid=st.sampled_from(IDS),
        queue=st.sampled_from(QUEUES),
        shape=shapes,
        how=st.sampled_from(["enqueue", "enqueue", "at_front", "in_short", "in_long", "at_long"]),
    )
    def enqueue_one(self, jid: str, queue: str, shape: Shape, how: str) -> None:
        self.enqueue(jid, queue, shape, how)

    def enqueue(self, jid: str, queue: str, shape: Shape, how: str) -> None:
        """A producer's enqueue with rq, of an id rq holds no live job of: an ended one is
        deleted first (rq keeps an ended job in its registries when its id is reused)."""
        old = self.jobs.get(jid)
        if old is not None:
            if old.status in LIVE:
                return
            Job.fetch(jid, connection=self.conn, serializer="json").delete()
            del self.jobs[jid]
        producer = (self.picklers if shape.pickled else self.producers)[queue]
        opts: dict[str, Any] = {"job_id": jid, **shape.kwargs}
        func, *args = shape.args
        if how in ("enqueue", "at_front"):
            producer.enqueue(func, *args, at_front=how == "at_front", **opts)
        elif how == "in_short":
            producer.enqueue_in(timedelta(seconds=SHORT_S), func, *args, **opts)
        elif how == "in_long":
            producer.enqueue_in(timedelta(seconds=LONG_S), func, *args, **opts)
        else:
            when = datetime.now(UTC) + timedelta(seconds=LONG_S)
            producer.enqueue_at(when, func, *args, **opts)
        j = J(jid, queue, shape, "queued", gen=next(self.gens))
        if how.startswith(("in", "at_long")):
            j.status = "scheduled"
            score = self.conn.zscore(ScheduledJobRegistry.key_template.format(queue), jid)
            assert score is not None
            j.due = score if how == "in_short" else math.inf
        elif how == "at_front":
            self.lists[queue].insert(0, jid)
        else:
            self.lists[queue].append(jid)
        self.jobs[jid] = j

    @precondition(lambda self: bool(self.jobs))
    @rule(i=st.integers(0, 7), how=st.sampled_from(["cancel", "delete"]))
    def rq_ends(self, i: int, how: str) -> None:
        """rq's Job.cancel() (off its queue and registries, never to run) or Job.delete()
        (the job and its registry entries are gone), whatever fnq does with it."""
        jid = sorted(self.jobs)[i % len(self.jobs)]
        j = self.jobs[jid]
        if how == "cancel" and j.status == "canceled":
            return
        job = Job.fetch(jid, connection=self.conn, serializer="json")
        if how == "cancel":
            job.cancel()
            j.status = "canceled"
        else:
            job.delete()
            del self.jobs[jid]
        self.unlist(jid)

    # -------------------------------------------------------- fnq's side
    @rule(jid=st.sampled_from(IDS), delay=st.sampled_from([0.0, 0.0, LONG_S]))
    def push_new(self, jid: str, delay: float) -> None:
        """fnq's own enqueue, on the first queue: only when rq holds no live job of the id
        (a finished, failed or canceled one is made anew, its deliveries from 0)."""
        old = self.jobs.get(jid)
        fresh = old is None or old.status not in LIVE
        pushed = run(self.loop, self.q.push_new(Call(jid, "demo", "echo", b"hi"), delay_s=delay))
        assert pushed is fresh, f"push_new({jid}) said {pushed}"
        if not fresh:
            return
        if old is not None:
            self.unlist(jid)
        j = J(jid, QUEUES[0], SHAPES[0], "queued", gen=next(self.gens))
        if delay:
            j.status = "scheduled"
        else:
            self.lists[j.queue].append(jid)
        self.jobs[jid] = j

    @rule(n=st.integers(1, 4), acks=st.integers(0, 2))
    def reserve(self, n: int, acks: int) -> None:
        self.take(n, acks)

    @precondition(lambda self: any(self.lists.values()))
    @rule(n=st.integers(1, 4))
    def reserve_more(self, n: int) -> None:
        """The same as reserve, taken twice as often."""
        self.take(n, 0)

    def take(self, n: int, acks: int) -> None:
        carried = [h.msg for h in self.held()[:acks]]
        for h in self.held()[:acks]:
            self.drop(h)  # the rq status stays as it is
        now = self.settle()
        buried = self.sweep(now)
        valid = [
            jid for name in QUEUES for jid in self.lists[name]
            if self.fresh(jid) and self.jobs[jid].shape.refused is None
        ]  # fmt: skip
        # What reserve_many does: rounds of n fresh jobs in queue order; the malformed
        # ones fail; the first round with a good one returns it (without waiting: one round).
        want: list[str] = []
        timeout = 1.0 if valid else 0.0
        while True:
            taken: list[str] = []
            for name in QUEUES:
                ids = self.lists[name]
                while ids and len(taken) < n:
                    jid = ids.pop(0)
                    if self.fresh(jid):
                        taken.append(jid)
            for jid in taken:
                if jid in self.holds:  # an old reservation of the id goes
                    self.drop(self.holds[jid])
                j = self.jobs[jid]
                j.prior += 1
                if j.shape.refused is not None:
                    self.fail(j, j.shape.refused)
                    buried.append((jid, j.shape.refused))
                else:
                    want.append(jid)
                    j.status = "started"
            if want or not taken or timeout == 0.0:
                break
        acked: list[bool] = []
        got = run(
            self.loop,
            self.q.reserve_many(n, timeout, ack=carried, on_acked=lambda: acked.append(True)),
        )
        assert acked == ([True] if carried else [])
        assert [m.call.id for m in got] == want, f"reserve_many({n}) gave the wrong jobs"
        for m in got:
            j = self.jobs[m.call.id]
            assert m.deliveries == j.prior, f"{j.id}: deliveries {m.deliveries}, not {j.prior}"
            assert (m.call.app, m.call.fn, m.call.body) == ("demo", "echo", j.shape.body)
            assert dict(m.call.headers) == j.shape.headers
            self.holds[j.id] = Hold(m, j.queue, j.gen)
        told = [(b.call_id, b.reason) for b in self.q.take_buried()]
        assert [i for i, _ in told] == [i for i, _ in buried]
        for (_, got_reason), (_, fragment) in zip(told, buried, strict=True):
            assert fragment in got_reason

    def sweep(self, now: float) -> list[tuple[str, str]]:
        """What a reserve does first: lapsed reservations in expiry order (back on their
        queue, or failed after too many deliveries), then due scheduled jobs; the burials."""
        buried: list[tuple[str, str]] = []
        for jid in self.lapse_order:
            h = self.holds.get(jid)
            if h is None or not h.lapsed:
                continue
            j = self.drop(h)
            if j is None or j.status not in LIVE:
                continue
            if j.prior >= MAX_DELIVERIES:
                self.fail(j, f"delivered {j.prior} time(s); the reservation lapsed each time")
                buried.append((jid, f"delivered {j.prior} time(s)"))
            else:
                j.status = "queued"
                self.lists[j.queue].append(jid)
        self.lapse_order = []
        for name in QUEUES:
            due = sorted(
                (j.due, j.id) for j in self.jobs.values()
                if j.status == "scheduled" and j.queue == name and j.due <= now
            )  # fmt: skip
            for _, jid in due:
                self.jobs[jid].status = "queued"
                self.lists[name].append(jid)
        return buried

    def pick(self, i: int) -> Hold:
        held = self.held()
        return held[i % len(held)]

    @precondition(lambda self: bool(self.holds))
    @rule(i=st.integers(0, 7), how=st.sampled_from(["ok", "error", "dead_letter", "ack"]))
    def end(self, i: int, how: str) -> None:
        """complete (FINISHED or FAILED), dead_letter (FAILED with the reason), or a plain
        ack (rq's status stays: started, in no registry). A job that ended meanwhile
        (canceled) keeps its end, and a job rq made anew of the id is left alone."""
        h = self.pick(i)
        if how == "ok":
            run(self.loop, self.q.complete(h.msg, ok()))
        elif how == "error":
            run(self.loop, self.q.complete(h.msg, Outcome(CallStatus.ERROR, error="it broke")))
        elif how == "dead_letter":
            run(self.loop, self.q.dead_letter(h.msg, "gave up"))
        else:
            run(self.loop, self.q.ack(h.msg))
        j = self.drop(h)
        if j is None or j.status not in LIVE or how == "ack":
            return
        if how == "ok":
            j.status = "finished"
        else:
            self.fail(j, "fnq: call error: it broke" if how == "error" else "fnq: gave up")

    @precondition(lambda self: bool(self.holds))
    @rule(i=st.integers(0, 7), delay=st.sampled_from([0.0, 0.0, SHORT_S, LONG_S]))
    def release(self, i: int, delay: float) -> None:
        """Back on its queue, or scheduled; no delivery charged. An ended (canceled) job
        stays ended, and a job rq made anew of the id is left alone."""
        h = self.pick(i)
        run(self.loop, self.q.release(h.msg, delay_s=delay))
        j = self.drop(h)
        if j is None or j.status not in LIVE:
            return
        j.prior -= 1
        if delay == 0:
            j.status = "queued"
            self.lists[j.queue].append(j.id)
            return
        j.status = "scheduled"
        score = self.conn.zscore(ScheduledJobRegistry.key_template.format(j.queue), j.id)
        assert score is not None
        j.due = score if delay < LONG_S else math.inf

    @precondition(lambda self: bool(self.holds))
    @rule(i=st.integers(0, 7))
    def extend(self, i: int) -> None:
        """Renews the reservation; one whose job rq deleted is lost (and goes)."""
        h = self.pick(i)
        if self.ghost(h):
            with pytest.raises(ReservationLost):
                run(self.loop, self.q.extend(h.msg))
            self.drop(h)
            return
        run(self.loop, self.q.extend(h.msg))
        h.lapsed = False

    @precondition(lambda self: bool(self.stale))
    @rule(i=st.integers(0, 30), op=st.sampled_from(["ack", "release", "extend", "complete"]))
    def stale_delivery(self, i: int, op: str) -> None:
        """A delivery already ended, handed back, lapsed or replaced changes nothing; but
        the complete of one whose job was acked (started, held by none) still ends it."""
        m, gen = self.stale[i % len(self.stale)]
        if op == "ack":
            run(self.loop, self.q.ack(m))
        elif op == "release":
            run(self.loop, self.q.release(m))
        elif op == "complete":
            j = self.jobs.get(m.call.id)
            if j is not None and j.gen == gen and j.status in LIVE:
                if j.status != "started" or m.call.id in self.holds:
                    return  # a late end of a job on its way again: not modelled
                j.status = "finished"
            run(self.loop, self.q.complete(m, ok()))
        else:
            with pytest.raises(ReservationLost):
                run(self.loop, self.q.extend(m))

    @precondition(lambda self: bool(self.holds))
    @rule(picks=st.lists(st.integers(0, 7), min_size=1, max_size=3))
    def lapse(self, picks: list[int]) -> None:
        """Some holders stop extending until their reservations run out: their expiries
        in fnq:rq:reserved are moved into the past (in this order), as time would."""
        held = self.held()
        lapsed = list(dict.fromkeys(held[i % len(held)].msg.call.id for i in picks))
        for jid in lapsed:
            self.conn.zadd(RESERVED_KEY, {jid: next(self.expiries)}, xx=True)
            self.holds[jid].lapsed = True
        self.lapse_order = [i for i in self.lapse_order if i not in lapsed] + lapsed
        order = [i.decode() for i in self.conn.zrangebyscore(RESERVED_KEY, 0, 1e9)]
        assert order == [i for i in self.lapse_order if i in self.holds and self.holds[i].lapsed]

    @precondition(lambda self: "failed" in {j.status for j in self.jobs.values()})
    @rule(pick=st.none() | st.lists(st.sampled_from([*IDS, "zz"]), max_size=3, unique=True))
    def dead_requeue(self, pick: list[str] | None) -> None:
        # Each queue's in the order of its FailedJobRegistry (rq's: expiry in whole seconds,
        # then id), which the invariants hold to the model's as a set.
        held = {
            n: FailedJobRegistry(n, connection=self.conn).get_job_ids(cleanup=False) for n in QUEUES
        }
        order = [i for n in QUEUES for i in held[n] if pick is None or i in pick]
        if pick is not None:
            order = [i for n in QUEUES for i in pick if i in held[n]]
        assert run(self.loop, self.q.dead_requeue(pick)) == len(order)
        for jid in order:
            j = self.jobs[jid]
            j.status, j.prior, j.reason = "queued", 0, None
            self.lists[j.queue].append(jid)

    @precondition(lambda self: "failed" in {j.status for j in self.jobs.values()})
    @rule(pick=st.none() | st.lists(st.sampled_from([*IDS, "zz"]), max_size=3, unique=True))
    def dead_purge(self, pick: list[str] | None) -> None:
        failed = {i for i, j in self.jobs.items() if j.status == "failed"}
        gone = failed if pick is None else failed & set(pick)
        assert run(self.loop, self.q.dead_purge(pick)) == len(gone)
        for jid in gone:
            del self.jobs[jid]

    # --------------------------------------------------------- invariants
    @invariant()
    def rq_agrees(self) -> None:
        for jid in IDS:
            j = self.jobs.get(jid)
            if j is None:
                assert not self.conn.exists(Job.key_for(jid)), f"{jid} should be gone"
                continue
            job = Job.fetch(jid, connection=self.conn, serializer="json")
            assert job.get_status() == j.status, f"{jid}: rq says {job.get_status()}"
        for name in QUEUES:
            mine = {i: j for i, j in self.jobs.items() if j.queue == name}

            def having(status: str, mine: dict[str, J] = mine) -> list[str]:
                return sorted(i for i, j in mine.items() if j.status == status)

            started = sorted(
                i for i, h in self.holds.items()
                if h.queue == name and not self.ghost(h) and mine[i].status == "started"
            )  # fmt: skip
            conn = self.conn
            seen = {
                "queued": [i.decode() for i in conn.lrange(f"rq:queue:{name}", 0, -1)],
                "scheduled": ScheduledJobRegistry(name, connection=conn).get_job_ids(cleanup=False),
                "started": StartedJobRegistry(name, connection=conn).get_job_ids(cleanup=False),
                "finished": FinishedJobRegistry(name, connection=conn).get_job_ids(cleanup=False),
                "failed": FailedJobRegistry(name, connection=conn).get_job_ids(cleanup=False),
                "canceled": CanceledJobRegistry(name, connection=conn).get_job_ids(cleanup=False),
            }
            want = {
                "queued": self.lists[name],
                "scheduled": having("scheduled"),
                "started": started,
                "finished": having("finished"),
                "failed": having("failed"),
                "canceled": having("canceled"),
            }
            for key in ("scheduled", "started", "finished", "failed", "canceled"):
                seen[key] = sorted(seen[key])
            assert seen == want, name

    @invariant()
    def no_job_lost(self) -> None:
        """A queued job is on its queue once: a reserve or a lapse will hand it out."""
        for j in self.jobs.values():
            if j.status == "queued":
                assert self.lists[j.queue].count(j.id) == 1, f"{j.id} is queued, on no queue"

    @invariant()
    def stats_agree(self) -> None:
        want = QueueStats(
            ready=sum(len(ids) for ids in self.lists.values()),
            delayed=sum(j.status == "scheduled" for j in self.jobs.values()),
            reserved=len(self.holds),
            dead=sum(j.status == "failed" for j in self.jobs.values()),
        )
        assert run(self.loop, self.q.stats()) == want
        held = {k.decode(): v.decode() for k, v in self.conn.hgetall(RECEIPTS_KEY).items()}
        assert held == {i: h.msg.receipt for i, h in self.holds.items()}

    @invariant()
    def dead_letters_agree(self) -> None:
        dead = {d.id: d for d in run(self.loop, self.q.dead_list(50))}
        failed = {i: j for i, j in self.jobs.items() if j.status == "failed"}
        assert sorted(dead) == sorted(failed)
        for jid, j in failed.items():
            d = dead[jid]
            assert j.reason is not None and j.reason in d.reason, (jid, d.reason, j.reason)
            assert d.deliveries == j.prior
            assert (d.call is None) == (j.shape.refused is not None)


def test_rq_bridge_follows_the_model(redis_server: RedisServer) -> None:
    class Model(RQModel):
        url = f"redis://127.0.0.1:{redis_server.port}/{DB}"

    run_state_machine_as_test(
        Model,
        settings=settings(max_examples=120, stateful_step_count=50),
    )


# ------------------------------------------------------- lapses in real time


@settings(max_examples=6)
@given(
    max_deliveries=st.integers(1, 2),
    lapses=st.lists(st.integers(0, 2), min_size=1, max_size=3),
)
def test_lapsed_jobs_come_back_then_fail_in_rq(
    redis_server: RedisServer, max_deliveries: int, lapses: list[int]
) -> None:
    """Job i is left to lapse lapses[i] times (300 ms reservations), then completed: it
    comes back queued with deliveries + 1 until delivered max_deliveries times, then it
    lapses once more and rq has it FAILED with the reason, told once by take_buried."""
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    ids = [f"l{i}" for i in range(len(lapses))]
    want = {i: min(n + 1, max_deliveries) for i, n in zip(ids, lapses, strict=True)}
    doomed = {i for i, n in zip(ids, lapses, strict=True) if n >= max_deliveries}

    async def main(conn: Redis) -> None:
        overrides = {"mq_reservation_msecs": 300, "mq_max_deliveries": max_deliveries}
        q = RQQueue.from_url(url, ["default"], load_settings().model_copy(update=overrides))
        producer = Queue("default", connection=conn, serializer="json")
        try:
            for i in ids:
                producer.enqueue("fnq.call", app="demo", fn="echo", job_id=i)
            seen = dict.fromkeys(ids, 0)
            told: list[tuple[str, str]] = []
            deadline = time.monotonic() + 10
            while seen != want or len(told) < len(doomed):
                assert time.monotonic() < deadline, f"stuck: {seen}, told {told}"
                for m in await q.reserve_many(5, 1.0):
                    i = m.call.id
                    seen[i] += 1
                    assert m.deliveries == seen[i] <= max_deliveries
                    assert Job.fetch(i, connection=conn).get_status() == "started"
                    if seen[i] > lapses[ids.index(i)]:
                        await q.complete(m, ok())
                told += [(b.call_id, b.reason) for b in q.take_buried()]
            assert sorted(i for i, _ in told) == sorted(doomed)
            assert all(f"delivered {max_deliveries} time(s)" in r for _, r in told)
            ends = {i: Job.fetch(i, connection=conn).get_status() for i in ids}
            assert ends == {i: "failed" if i in doomed else "finished" for i in ids}
            assert sorted(FailedJobRegistry("default", connection=conn).get_job_ids()) == sorted(
                doomed
            )
            assert StartedJobRegistry("default", connection=conn).get_job_ids() == []
            assert await q.stats() == QueueStats(0, 0, 0, len(doomed))
        finally:
            await q.close()

    conn = Redis.from_url(url)
    try:
        conn.flushdb()
        asyncio.run(main(conn))
    finally:
        conn.close()
