"""Properties of a worker under faults, on generated scenarios.

An in-process worker over the fake driver, the embedded SQLite queue and the
SQLite datastore (temporary files). Wrappers around the queue and the datastore
fail chosen operations: outages of the queue, of the datastore's reads, of its
writes (they wait, as the datastore's own writes do in an outage, or fail at
once), single operations that fail (before or after they took effect) and slow
ones. Each call's function answers, fails (502), crashes, hangs past its
timeout, is slow, or fails a few times first; max_attempts is random. The first
worker is stopped (one or two requests) at a random moment; a second worker on
the same queue and datastore runs through the rest of the faults, then drains
the queue once they are over.

Checked all along: an ack or a dead letter only for a call whose record is
final; no call dispatched while it already runs, or after its record is final.
Checked at the end: every call has one record, final; the queue holds nothing
but the dead letters of the calls that failed; attempts within max_attempts and
as the function behaved (exactly so for a call no fault or stop touched); a
success carries its own response; no more dispatches than attempts, but for
those a fault or a stop excuses; no exception out of run(), none logged.

Real time (the SQLite backends work in threads): every wait is bounded, and no
check depends on when something happened, only on what.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from config.domain import Call, CallStatus, Function, frozen_map, new_call_id
from config.settings import load_settings
from datastore.base import Datastore, open_datastore
from datastore.errors import StoreUnavailable
from mq.base import Message, MessageQueue, open_queue
from mq.errors import QueueUnavailable
from worker import calls as worker_calls
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest, DispatchResult, ExitInfo
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver
from worker.loop import Worker
from worker.shutdown import Shutdown

FN = Function(app="a", name="f", image="img/f", memory_mb=64)
TIMEOUT_S = 1  # the function's timeout (a hang costs this much per attempt)
BEHAVIOURS = ("ok", "slow", "e502", "crash", "hang", "flaky1", "flaky2")
DRAIN_S = 20.0  # the last worker ends every call within this, once the faults are over

READS = frozenset({"get_fn", "get_call", "get_calls", "list_workers", "cancel_requested"})
WRITES = frozenset({"record_running", "record_outcome", "record_retry", "end_buried"})


@dataclass
class Faults:
    """What fails now, and what the wrappers and the functions saw."""

    rng: random.Random
    op_fail_p: float = 0.0  # a single operation fails
    slow_p: float = 0.0  # a single operation takes up to 30 ms more
    queue_down: bool = False
    reads_down: bool = False
    writes: str = ""  # "" | "wait" (they wait for the end of the outage) | "raise"
    over: asyncio.Event = field(default_factory=asyncio.Event)  # no outage now
    hits: Counter[str] = field(default_factory=Counter)  # faults on each call's operations
    violations: list[str] = field(default_factory=list)
    deliveries: Counter[str] = field(default_factory=Counter)

    def off(self) -> None:
        self.op_fail_p = self.slow_p = 0.0
        self.queue_down = self.reads_down = False
        self.writes = ""
        self.over.set()

    async def slow(self) -> None:
        if self.slow_p and self.rng.random() < self.slow_p:
            await asyncio.sleep(self.rng.random() * 0.03)
        else:
            await asyncio.sleep(0)

    def once(self) -> bool:
        return bool(self.op_fail_p) and self.rng.random() < self.op_fail_p


def _ids(name: str, args: Sequence[Any]) -> list[str]:
    """The calls an operation is about."""
    if not args:
        return []
    first = args[0]
    if isinstance(first, Call):
        return [first.id]
    if isinstance(first, Message):
        return [first.call.id]
    if isinstance(first, str) and name != "get_fn":
        return [first]
    if isinstance(first, list | tuple):
        return [m.call.id if isinstance(m, Message) else str(m) for m in first]
    return []


class FaultyStore:
    """The real datastore, failing as ``faults`` says; the function comes with a short
    backoff."""

    def __init__(self, inner: Datastore, faults: Faults, fn: Function) -> None:
        self.inner = inner
        self.faults = faults
        self.fn = fn

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in READS | WRITES:
            return attr

        async def op(*args: Any, **kw: Any) -> Any:
            f = self.faults
            await f.slow()
            if name in READS and (f.reads_down or f.once()):
                f.hits.update(_ids(name, args))
                raise StoreUnavailable(f"injected: {name}")
            if name in WRITES:
                if f.writes == "wait":
                    await f.over.wait()
                elif f.writes == "raise" or f.once():
                    f.hits.update(_ids(name, args))
                    raise StoreUnavailable(f"injected: {name}")
            result = await attr(*args, **kw)
            if name == "get_fn" and result is not None:
                return self.fn
            return result

        return op


class FaultyQueue:
    """The real queue, failing as ``faults`` says; an ack or a dead letter of a call
    whose record is not final is a violation."""

    def __init__(self, inner: MessageQueue, faults: Faults, store: Datastore) -> None:
        self.inner = inner
        self.faults = faults
        self.store = store

    async def _fault(self, name: str, ids: list[str]) -> bool:
        """Raise before the operation, or say to raise after it."""
        f = self.faults
        await f.slow()
        if f.queue_down or f.once():
            f.hits.update(ids)
            if f.queue_down or f.rng.random() < 0.5:
                raise QueueUnavailable(f"injected: {name}")
            return True
        return False

    async def _final(self, why: str, msgs: Sequence[Message]) -> None:
        for m in msgs:
            record = await self.store.get_call(m.call.id)
            if record is None or not record.status.is_final:
                status = None if record is None else record.status
                self.faults.violations.append(f"{why} {m.call.id} while it is {status}")

    async def reserve_many(
        self, max_count: int, timeout_s: float, *, ack: Sequence[Message] = (), **kw: Any
    ) -> list[Message]:
        await self._final("acked", ack)
        after = await self._fault("reserve_many", [m.call.id for m in ack])
        msgs: list[Message] = await self.inner.reserve_many(max_count, timeout_s, ack=ack, **kw)
        self.faults.deliveries.update(m.call.id for m in msgs)
        if after:  # taken, but the answer was lost: they come back when they lapse
            raise QueueUnavailable("injected: reserve_many, after")
        return msgs

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        await self._final("acked", msgs)
        after = await self._fault("ack_many", [m.call.id for m in msgs])
        await self.inner.ack_many(msgs)
        if after:
            raise QueueUnavailable("injected: ack_many, after")

    async def ack(self, msg: Message) -> None:
        await self.ack_many([msg])

    async def dead_letter(self, msg: Message, reason: str) -> None:
        await self._final("dead-lettered", [msg])
        after = await self._fault("dead_letter", [msg.call.id])
        await self.inner.dead_letter(msg, reason)
        if after:
            raise QueueUnavailable("injected: dead_letter, after")

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        after = await self._fault("release", [msg.call.id])
        await self.inner.release(msg, delay_s)
        if after:
            raise QueueUnavailable("injected: release, after")

    async def extend(self, msg: Message) -> None:
        after = await self._fault("extend", [msg.call.id])
        await self.inner.extend(msg)
        if after:
            raise QueueUnavailable("injected: extend, after")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Functions:
    """The calls' behaviours, and each call's dispatches as the functions saw them."""

    faults: Faults
    store: Datastore  # the real one: a dispatch of a final call is a violation
    behaviour: dict[str, str]
    slow_s: dict[str, float]
    runs: dict[str, list[str]] = field(default_factory=dict)  # per dispatch: how it ended
    active: set[str] = field(default_factory=set)

    async def handle(self, container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        cid = request.call_id
        runs = self.runs.setdefault(cid, [])
        if cid in self.active:
            self.faults.violations.append(f"{cid} dispatched while it runs")
        self.active.add(cid)
        runs.append("begun")
        i = len(runs) - 1
        try:
            record = await self.store.get_call(cid)
            if record is not None and record.status.is_final:
                self.faults.violations.append(f"{cid} dispatched when it is {record.status}")
            kind = self.behaviour[cid]
            if kind == "slow":
                await asyncio.sleep(self.slow_s[cid])
            failing = kind in ("e502",) or (kind.startswith("flaky") and i < int(kind[5:]))
            if kind == "crash":
                runs[i] = "crash"
                container.exit(ExitInfo(exit_code=1))
                await asyncio.Event().wait()
            if kind == "hang":
                runs[i] = "hang"
                await asyncio.Event().wait()
            runs[i] = "502" if failing else "ok"
            body = b"bad gateway" if failing else f"out:{cid}".encode()
            return DispatchResult(502 if failing else 200, frozen_map(), body, False)
        finally:
            self.active.discard(cid)


class ExceptionLog(logging.Handler):
    """Log records that carry an exception (a fault of fnq's own)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.seen.append(record.getMessage())


@dataclass(frozen=True)
class Outage:
    after_s: float
    kind: str  # "queue" | "reads" | "wait" | "raise"
    for_s: float


@dataclass(frozen=True)
class Scenario:
    behaviours: list[str]
    max_attempts: int
    running_mark_msecs: int
    op_fail_p: float
    slow_p: float
    outages: list[Outage]
    stop_after_s: float
    second_stop_after_s: float | None
    grace_s: float
    prefetch: int


outages = st.builds(
    Outage,
    after_s=st.sampled_from([0.0, 0.05, 0.15, 0.3]),
    kind=st.sampled_from(["queue", "reads", "wait", "raise"]),
    for_s=st.sampled_from([0.05, 0.2, 0.5]),
)
scenarios = st.builds(
    Scenario,
    behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=8),
    max_attempts=st.integers(1, 3),
    running_mark_msecs=st.sampled_from([0, 20]),
    op_fail_p=st.sampled_from([0.0, 0.05, 0.2]),
    slow_p=st.sampled_from([0.0, 0.3]),
    outages=st.lists(outages, max_size=3),
    stop_after_s=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    second_stop_after_s=st.sampled_from([None, 0.0, 0.1]),
    grace_s=st.sampled_from([0.05, 0.5]),
    prefetch=st.integers(1, 3),
)


async def _chaos(faults: Faults, plan: Sequence[Outage]) -> None:
    for outage in plan:
        await asyncio.sleep(outage.after_s)
        faults.over.clear()
        if outage.kind == "queue":
            faults.queue_down = True
        elif outage.kind == "reads":
            faults.reads_down = True
        else:
            faults.writes = outage.kind
        await asyncio.sleep(outage.for_s)
        faults.queue_down = faults.reads_down = False
        faults.writes = ""
        faults.over.set()


async def _stop(worker: Worker, shutdown: Shutdown, excused: Counter[str]) -> None:
    """A stop request; the calls the worker holds then may have run without counting."""
    if not shutdown.stopping.is_set():
        excused.update(list(worker.running))
    shutdown.request("test")


async def _scenario(sc: Scenario, seed: int, tmp: str) -> None:
    settings = load_settings(
        data_dir=tmp,
        running_mark_msecs=sc.running_mark_msecs,
        async_chew_poll_msecs=50,
        mq_reservation_msecs=1000,
        mq_max_deliveries=1000,  # no call is buried for the hand-backs of the faults
    )
    fn = dataclasses.replace(
        FN, max_attempts=sc.max_attempts, timeout_s=TIMEOUT_S, retry_backoff_s=0.01
    )
    inner = await open_datastore(settings)
    await inner.create_fn(FN)
    queue = open_queue(settings.mq_url, settings)
    faults = Faults(random.Random(seed), op_fail_p=sc.op_fail_p, slow_p=sc.slow_p)
    faults.over.set()
    store = FaultyStore(inner, faults, fn)
    fq = FaultyQueue(queue, faults, inner)
    calls = [Call(new_call_id(), FN.app, FN.name, b"x") for _ in sc.behaviours]
    rng = random.Random(seed)
    functions = Functions(
        faults, inner,
        behaviour={c.id: b for c, b in zip(calls, sc.behaviours, strict=True)},
        slow_s={c.id: rng.choice([0.01, 0.1, 0.2]) for c in calls},
    )  # fmt: skip
    excused: Counter[str] = Counter()
    errors = ExceptionLog()
    logging.getLogger("fnq").addHandler(errors)
    driver = FakeDriver(FakeBehaviour(handler=functions.handle))
    try:
        for call in calls:
            await inner.record_queued(call)
        await queue.push_many(calls)
        async with Agent(settings, driver) as agent:
            chaos = asyncio.create_task(_chaos(faults, sc.outages))
            # The first worker, stopped at a random moment.
            shutdown = Shutdown(sc.grace_s)
            worker = Worker(settings, [fq], store, agent, prefetch=sc.prefetch,  # type: ignore[arg-type]
                            worker_id="w1", rng=random.Random(seed))  # fmt: skip
            run = asyncio.create_task(worker.run(shutdown))
            await asyncio.wait({run}, timeout=sc.stop_after_s)
            await _stop(worker, shutdown, excused)
            if sc.second_stop_after_s is not None:
                await asyncio.wait({run}, timeout=sc.second_stop_after_s)
                await _stop(worker, shutdown, excused)
            async with asyncio.timeout(DRAIN_S):
                await run  # raises what the worker raised
        async with Agent(settings, driver) as agent:
            # A new worker: the rest of the faults, then none, until every call has ended.
            shutdown = Shutdown(1.0)
            worker = Worker(settings, [fq], store, agent, prefetch=sc.prefetch,  # type: ignore[arg-type]
                            worker_id="w2", rng=random.Random(seed))  # fmt: skip
            run = asyncio.create_task(worker.run(shutdown))
            await chaos
            faults.off()

            async def drained() -> bool:
                stats = await queue.stats()
                records = await inner.get_calls([c.id for c in calls])
                return stats.ready + stats.reserved + stats.delayed == 0 and all(
                    r.status.is_final for r in records.values()
                )

            try:
                async with asyncio.timeout(DRAIN_S):
                    while not await drained() and not run.done():
                        await asyncio.sleep(0.02)
            finally:
                await _stop(worker, shutdown, Counter())
                async with asyncio.timeout(DRAIN_S):
                    await run
        await _check(sc, calls, inner, queue, functions, faults, excused)
        assert errors.seen == []
    finally:
        logging.getLogger("fnq").removeHandler(errors)
        await queue.close()
        await inner.close()


async def _check(
    sc: Scenario,
    calls: list[Call],
    store: Datastore,
    queue: MessageQueue,
    functions: Functions,
    faults: Faults,
    excused: Counter[str],
) -> None:
    assert faults.violations == []
    records = await store.get_calls([c.id for c in calls])
    assert set(records) == {c.id for c in calls}
    stats = await queue.stats()
    assert (stats.ready, stats.reserved, stats.delayed) == (0, 0, 0)
    dead = {d.id for d in await queue.dead_list(1000)}
    for call in calls:
        rec = records[call.id]
        kind = functions.behaviour[call.id]
        runs = functions.runs.get(call.id, [])
        what = f"{call.id} ({kind}): {rec.status} after {rec.attempts} attempt(s), ran {runs}"
        assert rec.status.is_final, what
        assert len(runs) <= faults.deliveries[call.id], what  # one dispatch per delivery at most
        # An attempt whose `running` record could not be put back (a fault, a stop)
        # stays counted when the call runs again (docs/worker.md, "Datastore outage").
        orphaned = faults.hits[call.id] + excused[call.id]
        assert rec.attempts <= sc.max_attempts + orphaned, what
        assert rec.attempts <= len(runs), what  # each attempt counted ran
        # A dispatch that no fault or stop touched counts.
        assert len(runs) - rec.attempts <= faults.hits[call.id] + excused[call.id], what
        if rec.status is CallStatus.SUCCESS:
            assert "ok" in runs, what
            assert rec.response_body == f"out:{call.id}".encode(), what
            assert call.id not in dead, what
        else:
            assert rec.status in (CallStatus.ERROR, CallStatus.TIMEOUT), what
            # failures are tried to the end
            assert sc.max_attempts <= rec.attempts <= sc.max_attempts + orphaned, what
            assert "ok" not in runs, what  # after an answer, every run answers
            # Dead-lettered, unless that failed: a later delivery finds the record final
            # and acks the message (docs/worker.md, step 3).
            assert call.id in dead or faults.hits[call.id] or excused[call.id], what
        if not faults.hits[call.id] and not excused[call.id]:
            # Untouched: it ran exactly as its function behaved.
            fails = int(kind[5:]) if kind.startswith("flaky") else 0
            if kind in ("ok", "slow") or (fails and fails < sc.max_attempts):
                assert rec.status is CallStatus.SUCCESS, what
                assert rec.attempts == len(runs) == fails + 1, what
            else:
                assert rec.status is not CallStatus.SUCCESS, what
                assert rec.attempts == len(runs) == sc.max_attempts, what


@settings(
    max_examples=10,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],  # each example takes seconds: no shrinking
)
@given(sc=scenarios, seed=st.integers(0, 2**32 - 1))
def test_calls_end_once_whatever_fails(sc: Scenario, seed: int) -> None:
    saved = worker_calls.RETRY_LATER_S
    worker_calls.RETRY_LATER_S = 0.05  # a call handed back for a fault comes back soon
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_scenario(sc, seed, tmp))
    finally:
        worker_calls.RETRY_LATER_S = saved
