"""Properties of the agent over the fake driver, on generated workloads.

* random workloads: functions that start, fail to start or never start, calls
  that answer, fail, hang, die or drop, at random moments, with cancels, exits,
  stop_waiting and close, on tight memory and CPU: every call ends once, as what
  happened to it allows, in time; the books add up all along; nothing is left
  after close;
* step by step: the same, one turn of the loop at a time (a state machine);
* calls the worker can serve (batches, one after another, evicting the idle
  containers of other functions) all succeed.

Each example runs on a fresh event loop with a virtual clock: whenever nothing
is ready, time jumps to the next timer, so seconds of function timeouts, idle
timeouts and grace periods cost nothing. A checker wakes every few virtual
milliseconds and looks at the agent's books; hooks on the evictor, the
launcher and the containers check each decision as it is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from config.domain import CallStatus, FailureKind, Function, Outcome, frozen_map
from tests.agent.conftest import make_call, make_fn, make_settings, tracker
from worker.agent import agent as agent_module
from worker.agent import launcher as launcher_module
from worker.agent.agent import Agent
from worker.agent.cpu import NeverSaturated
from worker.agent.driver import DispatchRequest, DispatchResult, ExitInfo
from worker.agent.drivers.fake import FakeBehaviour, FakeContainer, FakeDriver, Handler
from worker.agent.errors import ContainerInitFailed, DispatchError, FreezeFailed, ImageNotFound
from worker.agent.hot import EXIT_SETTLE_S, HotContainer
from worker.agent.launcher import Launcher
from worker.agent.pacer import PAUSE_SPACING_S
from worker.agent.resources import ASYNC_HIGH_WATER, ResourceTicket, Shortfall
from worker.agent.slots import ContainerState, RequestState, SlotQueue
from worker.agent.totals import MIB

# ------------------------------------------------------------ virtual time


class Stuck(Exception):
    """Nothing is ready and no timer is due: every task waits for ever."""


class _VirtualSelector(selectors.BaseSelector):
    """Polls the real selector without blocking; a wait moves the clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise Stuck("no task can ever wake up")
        self._loop.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now


class _VirtualPerfCounter:
    """Stands in for the time module in agent.py: a call's hold in loop time."""

    @staticmethod
    def perf_counter() -> float:
        return asyncio.get_running_loop().time()


async def timely_freeze(hot: HotContainer, slot: Any) -> None:
    """HotContainer._freeze, checking that the container has been idle long enough."""
    freeze_s = hot.settings.freeze_idle_s
    idle_s = asyncio.get_running_loop().time() - max(hot._idle_since, hot.queue.last_used_s)
    if freeze_s is None or idle_s < freeze_s - 1e-9:
        TIMING_PROBLEMS.append("paused too soon")
    await HOT_FREEZE(hot, slot)


async def timely_teardown(hot: HotContainer) -> None:
    """HotContainer._teardown, checking that one that times out has been idle long enough."""
    if hot.retire_reason == "idle timeout":
        idle_s = asyncio.get_running_loop().time() - hot._idle_since
        if idle_s < hot.fn.idle_timeout_s - 1e-9:
            TIMING_PROBLEMS.append("left before its idle timeout")
    await HOT_TEARDOWN(hot)


HOT_FREEZE, HOT_TEARDOWN = HotContainer._freeze, HotContainer._teardown
TIMING_PROBLEMS: list[str] = []  # what the hooks above saw (they run in the agent's tasks)


def hooked() -> contextlib.ExitStack:
    """The agent's code with the checks above and virtual time in place."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(agent_module, "time", _VirtualPerfCounter))
    stack.enter_context(mock.patch.object(Launcher, "_token", token_at_once))
    stack.enter_context(mock.patch.object(HotContainer, "_freeze", timely_freeze))
    stack.enter_context(mock.patch.object(HotContainer, "_teardown", timely_teardown))
    # Two containers grow freely, whatever this host's CPUs; then the launcher looks
    # at how busy they are.
    stack.enter_context(mock.patch.object(launcher_module, "cpu_count", lambda: 1))
    return stack


def run_virtual(main: Coroutine[Any, Any, None]) -> None:
    with hooked(), asyncio.Runner(loop_factory=VirtualLoop) as runner:
        runner.run(main)


# ---------------------------------------------------------------- workloads

# What a call's function does: the fake handler reads it from the call's body.
ACTIONS = ("ok", "fail", "bad", "hang", "die", "drop")
DELAYS = (0.0, 0.1, 0.45, 1.3, 2.6)  # never a whole second: none ties with a timeout
# How a function's containers start.
STARTS = ("fine", "slow", "init_fail", "no_image", "never", "no_pause", "no_unpause")
START_TIMEOUT_MSECS = 1000
START_BOUND_S = START_TIMEOUT_MSECS / 1000 + 5.0 + 0.5  # the driver's timeout, the margin
STEP_S = 0.05
START_S = {"slow": 0.3, "never": START_BOUND_S}  # how long a start takes, if not at once


@dataclass(frozen=True)
class FnSpec:
    memory_mb: int
    cpus_mcpu: int
    timeout_s: int
    idle_timeout_s: int
    start: str


@dataclass(frozen=True)
class CallSpec:
    fn: int
    at_s: float
    action: str
    delay_s: float
    cancel_after_s: float | None
    patience_s: float


@dataclass(frozen=True)
class Workload:
    fns: tuple[FnSpec, ...]
    calls: tuple[CallSpec, ...]
    kills: tuple[tuple[float, int], ...]  # (when, fn): a live container of it exits
    close_at_s: float | None
    stop_waiting_at_s: float | None  # stop_waiting() before close
    grace_s: float
    memory_mb: int
    cpu_mcpus: int
    freeze_msecs: int
    start_concurrency: int
    nb_tracker: bool
    count_idle: bool
    launcher_msecs: int


fn_specs = st.builds(
    FnSpec,
    memory_mb=st.sampled_from([128, 256, 384, 512, 2048]),
    cpus_mcpu=st.sampled_from([0, 250, 1000]),
    timeout_s=st.integers(1, 3),
    idle_timeout_s=st.sampled_from([0, 1, 3]),
    start=st.sampled_from(STARTS),
)
# On a coarse grid, so that things happen at the same moment, or anywhere.
times = st.integers(0, 60).map(lambda n: n * STEP_S) | st.integers(0, 3000).map(lambda n: n / 1000)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    fns = tuple(draw(st.lists(fn_specs, min_size=1, max_size=3)))
    call = st.builds(
        CallSpec,
        fn=st.integers(0, len(fns) - 1),
        at_s=times,
        action=st.sampled_from(ACTIONS),
        delay_s=st.sampled_from(DELAYS),
        cancel_after_s=st.none() | times,
        patience_s=st.sampled_from([0.0, 0.0, 0.03, 0.3]),
    )
    return Workload(
        fns=fns,
        calls=tuple(draw(st.lists(call, min_size=1, max_size=16))),
        kills=tuple(draw(st.lists(st.tuples(times, st.integers(0, len(fns) - 1)), max_size=3))),
        close_at_s=draw(st.none() | times),
        stop_waiting_at_s=draw(st.none() | times),
        grace_s=draw(st.sampled_from([0.0, 0.5, 5.0])),
        memory_mb=draw(st.sampled_from([512, 768, 1024])),
        cpu_mcpus=draw(st.sampled_from([1000, 2000])),
        freeze_msecs=draw(st.sampled_from([-1, 0, 200])),
        start_concurrency=draw(st.sampled_from([0, 1, 4])),
        nb_tracker=draw(st.booleans()),
        count_idle=draw(st.booleans()),
        launcher_msecs=draw(st.sampled_from([3_600_000, 100])),
    )


# ------------------------------------------------------------------- the run


@dataclass
class Books:
    """What the hooks saw."""

    problems: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)  # container id -> calls
    dispatched: dict[str, list[str]] = field(default_factory=dict)  # call id -> containers
    killed: set[str] = field(default_factory=set)  # containers made to exit

    def __post_init__(self) -> None:
        TIMING_PROBLEMS.clear()

    def check(self, ok: bool, what: str) -> None:
        if not ok and what not in self.problems:
            self.problems.append(what)
        for problem in TIMING_PROBLEMS:
            if problem not in self.problems:
                self.problems.append(problem)


def handler(books: Books) -> Handler:
    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        books.in_flight[container.id] += 1
        books.check(books.in_flight[container.id] == 1, f"{container.id} serves two calls")
        books.dispatched.setdefault(request.call_id, []).append(container.id)
        try:
            action, delay = request.body.decode().split()
            await asyncio.sleep(float(delay))
            body = request.call_id.encode()
            if action == "ok":
                return DispatchResult(200, frozen_map(), body)
            if action == "fail":
                return DispatchResult(502, frozen_map(), body)
            if action == "bad":
                return DispatchResult(500, frozen_map(), body)
            if action == "drop":
                raise DispatchError("dropped")
            if action == "die":
                container.exit(ExitInfo(exit_code=1))
            await asyncio.Event().wait()  # hang (or wait to be dropped, dead)
            raise AssertionError("unreachable")
        finally:
            books.in_flight[container.id] -= 1

    return handle


def behaviour(spec: FnSpec, handle: Handler) -> FakeBehaviour:
    if spec.start == "slow":
        return FakeBehaviour(handler=handle, start_delay_s=START_S["slow"])
    if spec.start == "init_fail":
        return FakeBehaviour(handler=handle, start_error=ContainerInitFailed("no socket"))
    if spec.start == "no_image":
        return FakeBehaviour(handler=handle, create_error=ImageNotFound("no such image"))
    if spec.start == "never":
        return FakeBehaviour(handler=handle, start_delay_s=1e6)
    if spec.start == "no_pause":
        return FakeBehaviour(handler=handle, pause_error=FreezeFailed("no pause"))
    if spec.start == "no_unpause":
        return FakeBehaviour(handler=handle, unpause_error=FreezeFailed("no unpause"))
    return FakeBehaviour(handler=handle)


def functions(specs: tuple[FnSpec, ...]) -> list[Function]:
    return [
        make_fn(
            f"f{i}",
            memory_mb=s.memory_mb,
            cpus_mcpu=s.cpus_mcpu,
            timeout_s=s.timeout_s,
            idle_timeout_s=s.idle_timeout_s,
        )
        for i, s in enumerate(specs)
    ]


Ending = tuple[CallStatus, FailureKind | None]
BUSY: Ending = (CallStatus.ERROR, FailureKind.BUSY)  # busy, closing, or stopped at close
FUNCTION_ERROR: Ending = (CallStatus.ERROR, FailureKind.FUNCTION)


def answered(action: str, delay_s: float, timeout_s: int) -> Ending:
    """How a call that ran to its end in a container ends."""
    if delay_s > timeout_s or action == "hang":
        return (CallStatus.TIMEOUT, FailureKind.FUNCTION)
    return (CallStatus.SUCCESS, None) if action == "ok" else FUNCTION_ERROR


IDLE_STATES = (ContainerState.IDLE, ContainerState.PAUSED)


def live_counts(queue: SlotQueue) -> int:
    return sum(n for state, n in queue.containers.items() if state is not ContainerState.WAIT)


def check_books(agent: Agent, driver: FakeDriver, books: Books) -> None:
    """What holds between any two steps of the loop."""
    stats = agent.tracker.statistics()
    hots = list(agent._hot)
    books.check(stats.memory_used_bytes <= stats.memory_total_bytes, "memory over the total")
    books.check(stats.cpu_used_mcpus <= stats.cpu_total_mcpus, "CPU over the total")
    held = [h.token for h in hots if not h.token.closed]
    # and room set aside for launches: held for a waiting one, or granted and not taken yet
    promised_mb, promised_mcpus, promised_tokens = agent.tracker.promised()
    books.check(
        stats.memory_used_bytes == (sum(t.memory_mb for t in held) + promised_mb) * MIB
        and stats.cpu_used_mcpus == sum(t.cpu_mcpus for t in held) + promised_mcpus
        and stats.tokens == len(held) + promised_tokens,
        "tokens in use are not those of the live containers and the launches",
    )
    books.check(
        sum(live_counts(q) for q in {h.queue for h in hots} | set(agent._queues.values()))
        == len(hots),
        "containers by state do not add up to the live containers",
    )
    books.check(
        agent.statistics().containers == sum(q.live_containers() for q in agent._queues.values()),
        "statistics() disagrees with the queues",
    )
    evictable = [h for h in hots if h.evict.evictable]
    books.check(
        agent.evictor.idle()
        == (sum(h.token.memory_mb for h in evictable), sum(h.token.cpu_mcpus for h in evictable)),
        "the evictor's idle sum is off",
    )
    for hot in evictable:
        books.check(hot.state in IDLE_STATES, f"a {hot.state} container is evictable")
    now = asyncio.get_running_loop().time()
    for hot in hots:
        slot, container = hot._slot, hot.container
        if hot.state in IDLE_STATES and slot is not None and not slot.taken:
            books.check(now - hot._idle_since <= hot.fn.idle_timeout_s + 0.05,
                        "an idle container outstays its idle timeout")  # fmt: skip
            freeze_s = agent.settings.freeze_idle_s
            if freeze_s is not None and not hot.frozen and hot.retire_reason is None:
                # paused in its turn: pauses are paced, one every PAUSE_SPACING_S
                late_s = now - max(hot._idle_since, hot.queue.last_used_s) - freeze_s
                books.check(late_s <= PAUSE_SPACING_S * len(hots) + 0.01,
                            "an idle container is not paused in time")  # fmt: skip
        if container is not None and not hot._ops.locked():
            state = getattr(container, "state", "")
            if state in ("running", "paused"):
                books.check(hot.frozen == (state == "paused"), "paused, as far as it knows?")
    queues = {h.queue for h in hots} | set(agent._queues.values())
    # A call handed a slot has left the waiting ones and runs once its task does.
    counted = sum(q.requests[RequestState.WAIT] + q.requests[RequestState.EXEC] for q in queues)
    handed = sum(h.state in IDLE_STATES and h._slot is not None and h._slot.taken for h in hots)
    books.check(counted <= len(agent._calls) <= counted + handed, "calls miscounted")
    known = {h.id for h in hots}
    books.check(all(c.id in known for c in driver.live), "a container lives that the agent forgot")
    for queue in agent._queues.values():
        check_queue(queue, hots, books)


def check_queue(queue: SlotQueue, hots: list[HotContainer], books: Books) -> None:
    c = queue.containers
    books.check(all(n >= 0 for n in c.values()), "a negative container count")
    books.check(all(n >= 0 for n in queue.requests.values()), "a negative call count")
    books.check(queue.asking <= len(queue.waiters), "more callers asking than waiting")
    books.check(queue.requests[RequestState.WAIT] == len(queue.waiters), "waiting miscounted")
    # A container that leaves after its call stays busy until it is gone.
    busy = sum(h.queue is queue and h.state is ContainerState.BUSY and h._slot is not None
               for h in hots)  # fmt: skip
    books.check(busy <= queue.requests[RequestState.EXEC], "more busy containers than calls")
    idle = c[ContainerState.IDLE] + c[ContainerState.PAUSED]
    books.check(queue.idle_slots <= idle, "more idle slots than idle containers")
    for slot in queue._stack:
        books.check(
            not slot.taken and slot.hot in hots and slot.hot.state in IDLE_STATES,
            f"an idle slot of a {slot.hot.state} container",
        )


def lent(agent: Agent) -> tuple[int, int]:
    return (0, 0) if agent.settings.async_count_idle else agent.evictor.idle()


async def check_gate(agent: Agent, books: Books) -> None:
    """wait_async_resource says yes at once under the 80 % mark, and no over it."""
    stats = agent.tracker.statistics()
    total = agent.tracker.totals
    lent_mb, lent_cpu = lent(agent)
    under = (
        stats.memory_used_bytes - lent_mb * MIB < total.memory_bytes * ASYNC_HIGH_WATER
        and stats.cpu_used_mcpus - lent_cpu < total.cpu_mcpus * ASYNC_HIGH_WATER
    )
    if under:
        books.check(await agent.wait_async_resource(0), "the gate is shut under the mark")
    elif await agent.wait_async_resource(0.001):  # then it went under meanwhile
        books.check(agent.tracker.below_async_high_water(*lent(agent)), "the gate is open over")


def hook_evictor(agent: Agent, books: Books) -> None:
    evict_for = agent.evictor.evict_for

    def checked(
        key: str, need: Shortfall, heir: ResourceTicket | None = None
    ) -> list[asyncio.Event]:
        before = {h: (h.evict.evictable, h.evict.requested) for h in agent._hot}
        others = [h for h in agent._hot if h.evict.evictable and h.queue.key != key]
        events = evict_for(key, need, heir)
        if (need.memory_mb > 0 or need.cpu_mcpus > 0) and (
            sum(h.token.memory_mb for h in others) >= need.memory_mb
            and sum(h.token.cpu_mcpus for h in others) >= need.cpu_mcpus
        ):
            books.check(bool(events), "evicted nothing though idle containers make room")
        chosen = [h for h in agent._hot if h.evict.requested and not before[h][1]]
        books.check(len(chosen) == len(events), "evicted other than it says")
        for hot in chosen:
            books.check(before[hot][0], "evicted a container that was not idle")
            books.check(hot.queue.key != key, "evicted a container of the same function")
        if chosen:
            books.check(
                sum(h.token.memory_mb for h in chosen) >= need.memory_mb
                and sum(h.token.cpu_mcpus for h in chosen) >= need.cpu_mcpus,
                "evicted too little to cover the shortfall",
            )
        return events

    agent.evictor.evict_for = checked  # type: ignore[method-assign]


async def token_at_once(launcher: Launcher, memory_mb: int, cpu_mcpus: int) -> Any:
    """Launcher._token, noting whether the token came without a wait."""
    token = launcher.tracker.try_acquire(memory_mb, cpu_mcpus)
    launcher.queue.token_at_once = token is not None  # type: ignore[attr-defined]
    return token if token is not None else await LAUNCHER_TOKEN(launcher, memory_mb, cpu_mcpus)


LAUNCHER_TOKEN = Launcher._token


def hook_launches(agent: Agent, books: Books) -> None:
    start = agent._start_container

    def checked(queue: SlotQueue, token: Any, owner: Any) -> None:
        # The launcher decides, then takes a token; when it came at once, the rule
        # still holds now. This launch counts as starting.
        if getattr(queue, "token_at_once", False):
            c = queue.containers
            idle = c[ContainerState.IDLE] + c[ContainerState.PAUSED]
            starting = c[ContainerState.START] + c[ContainerState.WAIT] - 1
            # callers that asked and wait for a container (one with an error only leaves)
            asking = sum(c.asked and c.error is None for c in queue.waiters)
            books.check(asking - idle > starting, "a launch the rule does not allow")
        start(queue, token, owner)

    agent._start_container = checked  # type: ignore[method-assign]


def expected(w: Workload, spec: CallSpec, early: bool, late: bool, cancelled: bool,
             killed: bool) -> set[Ending]:  # fmt: skip
    """The outcomes that fit what happened to a call (``early``: submitted before close,
    ``late``: after; neither: as it began)."""
    fn = w.fns[spec.fn]
    if late:
        return {BUSY}  # refused before anything else is looked at
    if fn.memory_mb > w.memory_mb or fn.cpus_mcpu > w.cpu_mcpus:
        return {(CallStatus.ERROR, FailureKind.TERMINAL)} | (set() if early else {BUSY})
    allowed = {BUSY, answered(spec.action, spec.delay_s, fn.timeout_s)}
    if cancelled:
        allowed.add((CallStatus.CANCELLED, FailureKind.CANCELLED))
    if fn.start == "no_image":
        allowed.add((CallStatus.ERROR, FailureKind.TERMINAL))
    if fn.start in ("init_fail", "never") or killed:
        allowed.add(FUNCTION_ERROR)
    return allowed


class Run:
    """One workload played on a fresh agent: its calls, cancels, kills and close."""

    def __init__(self, w: Workload, data_dir: Path) -> None:
        self.w = w
        self.books = books = Books()
        handle = handler(books)
        self.fns = functions(w.fns)
        self.driver = FakeDriver(
            per_image={f.image: behaviour(s, handle) for f, s in zip(self.fns, w.fns, strict=True)}
        )
        settings_ = make_settings(
            data_dir,
            freeze_idle_msecs=w.freeze_msecs,
            hot_start_concurrency=w.start_concurrency,
            hot_start_timeout_msecs=START_TIMEOUT_MSECS,
            enable_nb_resource_tracker=w.nb_tracker,
            async_count_idle=w.count_idle,
            shutdown_grace_msecs=int(w.grace_s * 1000),
            hot_launcher_timeout_msecs=w.launcher_msecs,
        )
        self.agent = Agent(settings_, self.driver, tracker(w.memory_mb, w.cpu_mcpus),
                           NeverSaturated())  # fmt: skip
        hook_evictor(self.agent, books)
        hook_launches(self.agent, books)
        self.call_ids: dict[int, str] = {}
        self.ended_at: dict[int, float] = {}
        self.cancelled: set[int] = set()
        self.closed_at: float | None = None
        self.gate_waits = False

    # ----------------------------------------------------------- the actors
    async def call(self, i: int, spec: CallSpec) -> Outcome:
        await asyncio.sleep(spec.at_s)
        fn = self.fns[spec.fn]
        call = make_call(fn, f"{spec.action} {spec.delay_s}".encode())
        self.call_ids[i] = call.id
        try:
            return await self.agent.submit(call, fn, launch_patience_s=spec.patience_s)
        finally:
            self.ended_at[i] = asyncio.get_running_loop().time()

    async def cancel(self, i: int, at_s: float) -> None:
        await asyncio.sleep(at_s)
        if i in self.call_ids and await self.agent.cancel(self.call_ids[i]):
            self.cancelled.add(i)

    async def kill(self, at_s: float, fn_i: int) -> None:
        await asyncio.sleep(at_s)
        for c in self.driver.live:
            if c.spec.image == self.fns[fn_i].image and c.state in ("running", "paused"):
                self.books.killed.add(c.id)
                c.exit(ExitInfo(exit_code=1))
                return

    async def stop_waiting(self, at_s: float) -> None:
        await asyncio.sleep(at_s)
        self.agent.stop_waiting()

    async def checker(self) -> None:
        # checks in a row that found something that should have moved on by now
        overdue: Counter[str] = Counter()

        def still(key: str, stuck: bool, what: str) -> None:
            overdue[key] = overdue[key] + 1 if stuck else 0
            self.books.check(overdue[key] < 4, what)  # three checks: 15 ms, over a poll

        while True:
            check_books(self.agent, self.driver, self.books)
            await check_gate(self.agent, self.books)
            under = self.agent.tracker.below_async_high_water(*lent(self.agent))
            still("gate", under and self.gate_waits, "the gate's waiter sleeps under the mark")
            for queue in list(self.agent._queues.values()):
                waiting = any(c.error is None for c in queue.waiters)
                still(f"slot {queue.key}", waiting and queue.idle_slots > 0,
                      "a call waits beside an idle container")  # fmt: skip
                # (a start since the last check makes a new case)
                still(f"launch {queue.key} {queue.containers_started}", self.launch_due(queue),
                      "calls wait for a container, there is room, and none starts")  # fmt: skip
            await asyncio.sleep(0.005)

    def launch_due(self, queue: SlotQueue) -> bool:
        """Calls ask for a container, none is idle or on its way, and one fits now."""
        c, fn = queue.containers, queue.fn
        return (
            not self.agent.waiting_stopped
            and any(c.asked and c.error is None for c in queue.waiters)
            and not any(c[s] for s in (*IDLE_STATES, ContainerState.START, ContainerState.WAIT))
            and self.agent.tracker.fits_now(fn.memory_mb + fn.tmpfs_mb, fn.cpus_mcpu)
            and not queue.short_calls_cycling(asyncio.get_running_loop().time())
        )

    async def gate(self) -> None:
        """Waits at the intake's gate, as the worker does; it opens under the mark."""
        while True:
            self.gate_waits = True
            try:
                opened = await self.agent.wait_async_resource(1.0)
            finally:
                self.gate_waits = False
            if opened:
                self.books.check(self.agent.tracker.below_async_high_water(*lent(self.agent)),
                                 "the gate opened over the mark")  # fmt: skip
                await asyncio.sleep(0.02)

    # -------------------------------------------------------------- the play
    async def play(self) -> None:
        w, agent, books = self.w, self.agent, self.books
        loop = asyncio.get_running_loop()
        await agent.__aenter__()
        watch = asyncio.create_task(self.checker())
        gate = asyncio.create_task(self.gate())
        jobs = [asyncio.create_task(self.call(i, s)) for i, s in enumerate(w.calls)]
        extras = [
            asyncio.create_task(self.cancel(i, s.at_s + s.cancel_after_s))
            for i, s in enumerate(w.calls)
            if s.cancel_after_s is not None
        ]
        extras += [asyncio.create_task(self.kill(at, f)) for at, f in w.kills]
        if w.stop_waiting_at_s is not None:
            extras.append(asyncio.create_task(self.stop_waiting(w.stop_waiting_at_s)))
        if w.close_at_s is not None:
            await asyncio.sleep(w.close_at_s)
            self.closed_at = loop.time()
            closing = asyncio.create_task(agent.close(w.grace_s))
        await asyncio.wait(jobs, timeout=60.0)
        await asyncio.gather(*extras)
        books.check(all(j.done() for j in jobs), "a call never returned")
        if self.closed_at is None:
            # Left alone, every container leaves at its idle timeout (a start that no
            # call waits for any more goes on until its own timeout).
            await asyncio.sleep(START_BOUND_S + max(s.idle_timeout_s for s in w.fns) + 1.0)
            check_books(agent, self.driver, books)
            books.check(not agent._hot and not self.driver.live, "a container stays on idle")
            closing = asyncio.create_task(agent.close(w.grace_s))
        await closing
        watch.cancel()
        gate.cancel()
        check_books(agent, self.driver, books)
        for i, job in enumerate(jobs):
            if job.done():
                self.check_outcome(i, job.result())
        self.check_closed()
        assert not books.problems, books.problems

    # ------------------------------------------------------------ the checks
    def check_outcome(self, i: int, out: Outcome) -> None:
        w, books, spec = self.w, self.books, self.w.calls[i]
        ended_at, closed_at = self.ended_at[i], self.closed_at
        took = ended_at - spec.at_s
        fn = w.fns[spec.fn]
        # A wait for a slot, longer by a start under way (which may wait its turn behind
        # every other start), the call, a death's settling.
        start_s = START_S.get(fn.start, 0.0)
        if w.start_concurrency:
            start_s += max(START_S.get(f.start, 0.0) for f in w.fns) * len(w.calls)
        bound = 2 * fn.timeout_s + start_s + EXIT_SETTLE_S + 0.1
        books.check(took <= bound, f"call {i} took {took:.2f} s, over {bound:.2f} s")
        if closed_at is not None and closed_at <= ended_at:
            since = max(closed_at, spec.at_s)  # a call submitted after close ends at once
            books.check(ended_at <= since + w.grace_s + 1.0,
                        f"call {i} ended {ended_at - since:.2f} s after close")  # fmt: skip
        stopped = closed_at is not None and ended_at >= closed_at + w.grace_s
        shut = [t for t in (w.close_at_s, w.stop_waiting_at_s) if t is not None]
        early = not shut or spec.at_s < min(shut)
        late = bool(shut) and spec.at_s > min(shut)
        killed = out.container_id in books.killed  # it may have died under the call
        allowed = expected(w, spec, early, late, i in self.cancelled, killed)
        if stopped:
            allowed.add(BUSY)
        got = (out.status, out.failure)
        books.check(got in allowed, f"call {i} ({spec}): {got} not in {allowed}: {out.error}")
        call_id = self.call_ids[i]
        sent_to = books.dispatched.get(call_id, [])
        if out.container_id is None:
            books.check(not sent_to, f"call {i} ran but its outcome says it did not")
        else:
            books.check(sent_to == [out.container_id], f"call {i} went to {sent_to}")
        if out.status is CallStatus.SUCCESS:
            assert out.response is not None
            books.check(out.response.body == call_id.encode(), f"call {i} got another's answer")

    def check_closed(self) -> None:
        agent, books = self.agent, self.books
        stats = agent.tracker.statistics()
        books.check((stats.tokens, stats.memory_used_bytes, stats.cpu_used_mcpus) == (0, 0, 0),
                    "tokens held after close")  # fmt: skip
        books.check(not self.driver.live and self.driver.closed, "containers left after close")
        books.check(agent.tasks_alive == 0 and not agent._hot, "tasks left after close")
        books.check(not agent._calls, "calls left after close")
        books.check(len(agent.evictor) == 0 and agent.evictor.idle() == (0, 0), "evictor left")
        for queue in agent._queues.values():
            books.check(queue.is_idle() and not queue.waiters and not queue.idle_slots,
                        "a queue not empty after close")  # fmt: skip


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=workloads())
def test_random_workloads_keep_the_agents_books(settings_env: Path, w: Workload) -> None:
    run_virtual(Run(w, settings_env / "data").play())


# ------------------------------------------------------------------ liveness


@dataclass(frozen=True)
class Batch:
    fn: int
    calls: int
    delay_s: float
    kill_idle: bool  # an idle container of the function dies before the batch


@dataclass(frozen=True)
class Servable:
    """Batches of calls, one after another, each of which the worker can serve."""

    fns: tuple[FnSpec, ...]
    room: int  # containers that fit at once, of any function
    batches: tuple[Batch, ...]
    freeze_msecs: int
    start_concurrency: int


@st.composite
def servable(draw: st.DrawFn) -> Servable:
    fns = tuple(
        draw(
            st.lists(
                st.builds(
                    FnSpec,
                    memory_mb=st.just(256),
                    cpus_mcpu=st.sampled_from([0, 250]),
                    timeout_s=st.just(3),
                    idle_timeout_s=st.sampled_from([1, 30]),
                    start=st.sampled_from(["fine", "slow"]),
                ),
                min_size=1,
                max_size=3,
            )
        )
    )
    room = draw(st.integers(1, 3))
    batch = st.builds(
        Batch,
        fn=st.integers(0, len(fns) - 1),
        calls=st.integers(1, 2 * room),
        delay_s=st.sampled_from([0.0, 0.01, 0.2]),
        kill_idle=st.booleans(),
    )
    return Servable(
        fns=fns,
        room=room,
        batches=tuple(draw(st.lists(batch, min_size=1, max_size=6))),
        freeze_msecs=draw(st.sampled_from([-1, 0, 50])),
        start_concurrency=draw(st.sampled_from([0, 1, 4])),
    )


async def serve_all(s: Servable, data_dir: Path) -> None:
    """Each batch comes once the one before is over: the other functions' containers are
    idle then, and evicting them makes room, so every call succeeds."""
    books = Books()
    handle = handler(books)
    fns = functions(s.fns)
    driver = FakeDriver(
        per_image={fn.image: behaviour(f, handle) for fn, f in zip(fns, s.fns, strict=True)}
    )
    settings_ = make_settings(
        data_dir, freeze_idle_msecs=s.freeze_msecs, hot_start_concurrency=s.start_concurrency
    )
    agent = Agent(settings_, driver, tracker(256 * s.room, 250 * s.room), NeverSaturated())
    hook_evictor(agent, books)
    async with agent:
        for n, batch in enumerate(s.batches):
            fn = fns[batch.fn]
            if batch.kill_idle:
                for c in driver.live:
                    if c.spec.image == fn.image and c.state in ("running", "paused"):
                        c.exit(ExitInfo(exit_code=1))
                        break
            calls = [make_call(fn, f"ok {batch.delay_s}".encode()) for _ in range(batch.calls)]
            outs = await asyncio.gather(*(agent.submit(call, fn) for call in calls))
            for out in outs:
                books.check(out.status is CallStatus.SUCCESS,
                            f"batch {n}: {out.status} {out.failure}: {out.error}")  # fmt: skip
            check_books(agent, driver, books)
    assert not books.problems, books.problems


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=servable())
def test_calls_the_worker_can_serve_all_succeed(settings_env: Path, s: Servable) -> None:
    run_virtual(serve_all(s, settings_env / "data"))


# ---------------------------------------------------------- step by step


class AgentMachine(RuleBasedStateMachine):
    """Calls, cancels, exits and time, interleaved one turn of the loop at a time: a
    cancel or an exit can land between any two steps of the agent."""

    data_dir = Path()

    def __init__(self) -> None:
        super().__init__()
        self.hooks = hooked()
        self.loop = VirtualLoop()
        self.books = Books()
        handle = handler(self.books)
        self.fns = [
            make_fn("a", memory_mb=256, timeout_s=2, idle_timeout_s=1),
            make_fn("b", memory_mb=512, cpus_mcpu=1000, timeout_s=1, idle_timeout_s=3),
            make_fn("c", memory_mb=256, timeout_s=1, idle_timeout_s=0),
            make_fn("d", memory_mb=256, timeout_s=1, idle_timeout_s=1),
        ]
        self.driver = FakeDriver(
            per_image={
                self.fns[0].image: FakeBehaviour(handler=handle),
                self.fns[1].image: FakeBehaviour(handler=handle, start_delay_s=0.05),
                self.fns[2].image: FakeBehaviour(handler=handle, unpause_error=FreezeFailed("x")),
                self.fns[3].image: FakeBehaviour(
                    handler=handle, start_delay_s=0.02, start_error=ContainerInitFailed("x")
                ),
            }
        )
        self.agent = Agent(
            make_settings(self.data_dir, freeze_idle_msecs=20, hot_start_concurrency=2),
            self.driver,
            tracker(768, 1000),
            NeverSaturated(),
        )
        hook_evictor(self.agent, self.books)
        hook_launches(self.agent, self.books)
        self.calls: list[tuple[str, asyncio.Task[Outcome]]] = []
        self.specs: dict[str, tuple[int, str, float]] = {}
        self.cancelled: set[str] = set()
        self.closing: asyncio.Task[None] | None = None
        self.loop.run_until_complete(self.agent.__aenter__())

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(
        fn=st.integers(0, 3),
        action=st.sampled_from(ACTIONS),
        delay=st.sampled_from(DELAYS),
        patience=st.sampled_from([0.0, 0.01]),
    )
    def submit(self, fn: int, action: str, delay: float, patience: float) -> None:
        call = make_call(self.fns[fn], f"{action} {delay}".encode())
        submit = self.agent.submit(call, self.fns[fn], launch_patience_s=patience)
        self.calls.append((call.id, self.loop.create_task(submit)))
        self.specs[call.id] = (fn, action, delay)

    @rule(grace=st.sampled_from([0.0, 0.2]))
    def close(self, grace: float) -> None:
        if self.closing is None:
            self.closing = self.loop.create_task(self.agent.close(grace))

    @rule()
    def stop_waiting(self) -> None:
        self.agent.stop_waiting()

    @rule(turns=st.integers(1, 8))
    def step(self, turns: int) -> None:
        async def turn() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)

        self._run(turn())

    @rule(dt=st.sampled_from([0.001, 0.01, 0.05, 0.3, 1.5]))
    def wait(self, dt: float) -> None:
        self._run(asyncio.sleep(dt))

    @rule(pick=st.integers(0, 50))
    def cancel(self, pick: int) -> None:
        if self.calls:
            call_id, _ = self.calls[pick % len(self.calls)]
            if self._run(self.agent.cancel(call_id)):
                self.cancelled.add(call_id)

    @rule(pick=st.integers(0, 50))
    def kill(self, pick: int) -> None:
        live = [c for c in self.driver.live if c.state in ("running", "paused", "created")]
        if live:
            container = live[pick % len(live)]
            self.books.killed.add(container.id)
            container.exit(ExitInfo(exit_code=1))

    @invariant()
    def books_kept(self) -> None:
        async def check() -> None:
            check_books(self.agent, self.driver, self.books)

        self._run(check())
        assert not self.books.problems, self.books.problems
        for call_id, task in self.calls:
            if task.done():
                self.check_outcome(call_id, task.result())

    def check_outcome(self, call_id: str, out: Outcome) -> None:
        fn, action, delay = self.specs[call_id]
        got = (out.status, out.failure)
        allowed = {BUSY, answered(action, delay, self.fns[fn].timeout_s)}
        if call_id in self.cancelled:
            allowed.add((CallStatus.CANCELLED, FailureKind.CANCELLED))
        if out.container_id in self.books.killed or fn == 3:  # d's containers never start
            allowed.add(FUNCTION_ERROR)
        assert got in allowed, f"{action} {delay} of {self.fns[fn].name}: {got}: {out.error}"
        sent_to = self.books.dispatched.get(call_id, [])
        if out.container_id is None:
            assert not sent_to, "a call ran but its outcome says it did not"
        else:
            assert sent_to == [out.container_id], f"a call went to {sent_to}"

    def teardown(self) -> None:
        try:
            self._run(self.closing or self.agent.close(grace_s=0.5))
            if self.calls:
                self._run(asyncio.wait([t for _, t in self.calls], timeout=1.0))
            for call_id, task in self.calls:
                assert task.done(), "a call outlived close"
                self.check_outcome(call_id, task.result())
            stats = self.agent.tracker.statistics()
            assert (stats.tokens, stats.memory_used_bytes, stats.cpu_used_mcpus) == (0, 0, 0)
            assert not self.driver.live and self.agent.tasks_alive == 0
            assert len(self.agent.evictor) == 0 and not self.agent._calls
        finally:
            self.loop.close()
            self.hooks.close()


def test_agent_step_by_step(settings_env: Path) -> None:
    AgentMachine.data_dir = settings_env / "data"
    run_state_machine_as_test(
        AgentMachine, settings=settings(max_examples=200, stateful_step_count=40)
    )
