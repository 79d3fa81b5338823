"""The agent: run a call in a warm container of its function, return an Outcome.

The story of one call, from the top
===================================

**Submit.** The worker hands :meth:`Agent.submit` a call and the function it
belongs to. The agent first refuses what cannot run: when it is closing, or
no longer lets calls wait (see *Close*), the call comes back at once as
*busy* (try another worker); when the function
asks for more memory or CPU than this machine could ever give, it comes back
*terminal*, because no retry can help. ``submit`` never raises for anything
that concerns the call itself; every ending is an :class:`Outcome`.

**Wait for a slot.** Containers of one function configuration (image,
limits, timeouts, config; see :func:`slots.slot_key`) are interchangeable, so
they share one slot queue. An idle container sits in that queue as a slot.
The call joins the queue as a waiting caller and tries to take a slot, the
most recently idled one first. If none is free it nudges the queue's
launcher, then sleeps until a slot is handed to it (a container that
becomes idle goes to the call that has waited longest), the launcher reports
a failure meant for it, the call is cancelled, or the agent stops letting
calls wait (:meth:`Agent.stop_waiting`, or closing); it nudges
again every ``FN_HOT_POLL_MSECS``. While one of the queue's containers is
busy, the first nudge waits about one call's time (how long calls of this
queue have held a container lately, at most 20 ms): that container is
usually free again long before a new one could start. A caller may bring a
longer patience of its own (``submit(launch_patience_s=...)``). Only callers
that have nudged count towards a launch. After the function's
own timeout of waiting it gives up: *busy*, no attempt charged; unless a
container of its function is starting then: it waits for that start, which
ends within its own timeouts, and gets its container or its error
(:mod:`waiting`).

**Launch.** The launcher (one task per queue, :mod:`launcher`) starts a
container only when waiting calls that have nudged outnumber the idle and
starting containers; while its calls are short and a container is busy, one
start at a time, and once the worker has two containers per CPU none unless
its containers were busy most of the last quarter second and the host has
CPU to spare (:mod:`launcher`, :mod:`cpu`).
It needs a memory/CPU token first (:mod:`resources`), and waits in line for
one: launches of functions without a container first, then in the order they
came. When there is no room,
it evicts idle containers of *other* functions, oldest first, all or nothing
(:mod:`evictor`), and waits for them to go; the room they free is held for it.
So it does, before it takes a token, when the host has no room for another
container (the worker's file descriptors, inodes for socket directories: the
driver says how many containers must go, counting those still starting); if
not enough are idle, it waits while other containers start, and with none
starting, the start meets the shortage and the call goes back to the queue.
A call whose
container needs a new connection to its socket (the kept-alive one lapsed)
and finds no descriptor for it does the same, then tries once more on the
same container (:meth:`hot.HotContainer._make_host_room`).
A function without a container whose launch has waited
``FN_HOT_DISPLACE_WAIT_PERCENT`` of its timeout also takes the room of busy
containers of other functions, each leaving once its current call is over
(:mod:`launcher`). The new container lives in its
own task (:mod:`hot_life`): create (pulling the image if needed), start, wait for
the function's socket. At most ``FN_HOT_START_CONCURRENCY`` containers start
at once; a start that had to wait for its turn is dropped if by then every
waiting call of its function has a container. If a start fails, the call
that nudged gets the error:
*terminal* for a missing or unusable image, *function* for a container that
would not initialise, *busy* for a pull that took too long. While none of the
configuration's containers is up, an image or initialisation error goes to
every call waiting for one: their own starts would fail alike.

**Exec.** The call that wins a slot runs on that container in its own task:
unpause it if it was frozen, route its output to the call's bounded log,
post the request (with its deadline) over the socket, and wait for the
answer, the function's timeout, the container's death or a cancel. The call
counts as dispatched (``submit``'s ``on_start``) once the function's socket
has taken its connection, before the request is written. If the container
turns out to be broken before that (dead, its exit not reported yet),
nothing ran: the call has not been dispatched, and simply waits for another
slot. If the function never accepts the connection within the call's timeout
(the kernel queued it in the listener's backlog, or the backlog stayed full),
nothing ran either, but the function failed the call as one whose container
never starts does: the container is retired and the call comes back
unstarted, the function's failure (:class:`NotAccepted`).

**End.** The answer becomes the outcome: 200 success, 502 function failed,
504 timeout (the container stays warm for the next call in those three
cases); any other answer, a broken exchange, a timeout, a death or a cancel
retires the container, since its state is unknown. The container then goes
back to idle (paused after ``FN_FREEZE_IDLE_MSECS``) and offers a new slot,
until its idle timeout passes with no call, it is evicted, a newer definition
of its function comes with another slot key (:meth:`Agent._retire_superseded`),
its image name comes to stand for another image
(:meth:`Agent.retire_replaced_images`), or the agent closes; then it is
removed and its token freed.

**Close.** When the worker is asked to stop, :meth:`Agent.stop_waiting`
sends every call that waits for a container back as *busy* at once, and so
every call submitted after it; no container is started any more, and calls
in containers run on. A slot handed to a waiting call at that moment goes
back to its container: the call either has taken its slot and runs, or
returns unstarted. :meth:`Agent.close` does the same, lets running calls
finish within the grace period, stops the rest, then removes every container
and closes the driver. No task outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from datetime import datetime
from types import TracebackType

from config.domain import CALL_ID_RE, Call, Function, Outcome, headers_problem, utcnow
from config.errors import AgentError, reason_of
from config.settings import Settings
from worker.agent.cpu import CpuGauge
from worker.agent.cpu import gauge as cpu_gauge
from worker.agent.cpu_split import CpuSplit
from worker.agent.driver import Driver
from worker.agent.errors import (
    AgentClosed,
    HostShort,
    InvalidCall,
    NotAccepted,
    ResourceTooBig,
    ServerBusy,
)
from worker.agent.evictor import Evictor
from worker.agent.execution import (
    ExecEnd,
    StopControl,
    cancelled_outcome,
    not_started_outcome,
    ran_outcome,
)
from worker.agent.fleet import Fleet
from worker.agent.hot import HotContainer, SlotUnusable
from worker.agent.hot_life import REMOVE_TIMEOUT_S
from worker.agent.logbuf import LogBuffer
from worker.agent.pacer import FreezePacer
from worker.agent.resources import ResourceTracker
from worker.agent.slots import ContainerState, RequestState, SlotQueue
from worker.agent.stats import AgentStats, QueueStats
from worker.agent.tasks import TaskSet
from worker.agent.waiting import SlotWaits

log = logging.getLogger("fnq.agent")

STOP_SETTLE_S = 10.0  # after the grace, how long stopped calls get to wind down
DRIVER_CLOSE_TIMEOUT_S = 60.0


class Agent(SlotWaits, Fleet):
    def __init__(
        self,
        settings: Settings,
        driver: Driver,
        tracker: ResourceTracker | None = None,
        cpu: CpuGauge | None = None,
        cpu_split: CpuSplit | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.driver = driver
        # The time of day of the outcomes' starts and ends (a worker gives the datastore's).
        self.clock = clock
        self.tracker = tracker or ResourceTracker.from_host(settings)
        self.evictor = Evictor(self.tracker.lent_changed, self.tracker.first_starving)
        self.cpu = (
            cpu
            if cpu is not None
            else cpu_gauge(settings.hot_grow_spare_mcpus, lambda: self.cpu_split.containers_on)
        )
        self.pacer = FreezePacer()
        starts = settings.hot_start_concurrency
        self.start_turns = asyncio.Semaphore(starts) if starts > 0 else None
        self.hot_poll_s = settings.secs("hot_poll_msecs")
        self._queues: dict[str, SlotQueue] = {}
        self._keys: dict[int, tuple[Function, str]] = {}
        # the newest definition of each function seen: its updated_at and slot key
        self._newest: dict[tuple[str, str], tuple[datetime, str]] = {}
        self._launchers = TaskSet("launcher")
        self._containers = TaskSet("container")
        self._hot: dict[HotContainer, asyncio.Task[None]] = {}
        self._calls: dict[str, StopControl] = {}
        self._no_calls = asyncio.Event()
        self._no_calls.set()
        self._closing = asyncio.Event()
        self._closed = asyncio.Event()
        self._no_waiting = False  # set by stop_waiting and close: no call waits any more
        self.cpu_split = cpu_split or CpuSplit(
            settings.cpu_split,
            driver.place,
            containers=self._hot.__len__,
        )
        self._background = TaskSet("agent")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the agent runs in (looked up once: CPython 3.11 makes a system
        call in every ``get_running_loop``, and a call would look it up a dozen times)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def __aenter__(self) -> Agent:
        try:
            async with asyncio.timeout(self.settings.secs("hot_pull_timeout_msecs")):
                await self.driver.start()
        except BaseException:
            await self.driver.close()  # release what a half-done start opened
            raise
        if self.cpu_split.mode != "off":
            self._background.spawn(self.cpu_split.run(), name="fnq-cpu-split")
        self._background.spawn(self._watch_images(), name="fnq-image-watch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(self.settings.secs("shutdown_grace_msecs"))

    # ------------------------------------------------------------- submit
    async def submit(
        self,
        call: Call,
        fn: Function,
        on_start: Callable[[], None] | None = None,
        *,
        launch_patience_s: float = 0.0,
    ) -> Outcome:
        """Run ``call``; ``on_start`` is called when it is dispatched: once a container's
        function has taken its connection (at most once).
        ``launch_patience_s``: wait at least this long for a container of the function
        before asking for a new one."""
        if self._no_waiting:
            return self._not_started(AgentClosed())
        if call.id in self._calls:
            return self._not_started(ServerBusy(f"call {call.id} is already running here"))
        stop = StopControl(on_start, self.loop)
        stop.launch_patience_s = launch_patience_s
        self._calls[call.id] = stop
        self._no_calls.clear()
        try:
            return await self._submit(call, fn, stop)
        finally:
            del self._calls[call.id]
            if not self._calls:
                self._no_calls.set()

    def _not_started(self, exc: AgentError) -> Outcome:
        return not_started_outcome(exc, self.clock())

    async def _submit(self, call: Call, fn: Function, stop: StopControl) -> Outcome:
        if not CALL_ID_RE.fullmatch(call.id):  # it goes into the request's head as it is
            return self._not_started(InvalidCall(f"call id {call.id[:80]!r} is not valid"))
        if call.headers and (problem := headers_problem(call.headers)) is not None:
            return self._not_started(InvalidCall(f"call {call.id}: {problem}"))
        memory_mb, cpu_mcpus = fn.memory_mb + fn.tmpfs_mb, fn.cpus_mcpu
        if not self.tracker.is_possible(memory_mb, cpu_mcpus):
            too_big = self.tracker.too_big(memory_mb, cpu_mcpus)
            return self._not_started(ResourceTooBig(f"{fn.ref} {too_big}"))
        loop = self.loop
        queue = self._queue_for(fn)
        deadline = loop.time() + fn.timeout_s
        buffer = LogBuffer(
            self.settings.max_log_size_bytes,
            label=f"{fn.ref} {call.id}",
            debug_copy=not self.settings.disable_debug_user_logs,
        )
        while True:
            try:
                slot = await self._get_slot(queue, call.id, deadline, stop)
            except AgentError as exc:
                return self._not_started(exc)
            if slot is None:
                if stop.end is ExecEnd.CANCELLED:
                    return cancelled_outcome(stop.reason, self.clock())
                return self._not_started(AgentClosed())
            queue.requests[RequestState.EXEC] += 1
            taken_at = time.perf_counter()  # uvloop's loop.time() counts whole ms
            try:
                run = await slot.hot.serve(slot, call, fn.timeout_s, buffer.write, stop)
            except SlotUnusable as exc:
                log.debug("call %s: container unusable before dispatch (%s)", call.id, exc)
                continue
            except HostShort as exc:  # nothing reached the container: back to the queue
                return self._not_started(exc)
            except NotAccepted as exc:  # nothing ran; its stuck container is retired
                log.warning("call %s: %s", call.id, exc)
                return self._not_started(exc)
            finally:
                queue.requests[RequestState.EXEC] -= 1
            queue.held(time.perf_counter() - taken_at, loop.time())
            self.cpu.touch()
            return ran_outcome(run, buffer, slot.hot.id, fn.image)

    # ------------------------------------------------------------- others
    async def wait_async_resource(self, timeout_s: float) -> bool:
        """True once memory and CPU use are both under 80 %; False after ``timeout_s``.

        Idle and paused containers count only with FN_ASYNC_COUNT_IDLE (Fn's rule).
        Otherwise what they hold is room the worker takes back when a call needs it
        (the call takes one, or its launch evicts one), and they never hold the intake.
        """
        if self.settings.async_count_idle:
            return await self.tracker.wait_async_resource(timeout_s)
        return await self.tracker.wait_async_resource(timeout_s, self.evictor.idle)

    async def cancel(self, call_id: str) -> bool:
        """Stop a waiting or running call; its submit() returns CANCELLED."""
        stop = self._calls.get(call_id)
        if stop is None:
            return False
        return stop.stop(ExecEnd.CANCELLED, "the call was cancelled")

    def free_containers(self, fns: Collection[tuple[str, str]], within_s: float) -> int:
        """Containers of the functions ``fns`` (app, fn) that are idle and not paused,
        or that run a call while their calls usually take less than ``within_s``."""
        free = 0
        for queue in self._queues.values():
            if (queue.fn.app, queue.fn.name) not in fns:
                continue
            free += queue.containers[ContainerState.IDLE]
            if 0.0 < queue.call_s < within_s:
                free += queue.containers[ContainerState.BUSY]
        return free

    def statistics(self) -> AgentStats:
        return AgentStats(
            resources=self.tracker.statistics(),
            queues=tuple(QueueStats.of(queue) for queue in self._queues.values()),
            evictions=self.evictor.evictions,
            closing=self._closing.is_set(),
            displacements=self.evictor.displacements,
        )

    @property
    def tasks_alive(self) -> int:
        """Background tasks still running (launchers and containers)."""
        return len(self._launchers) + len(self._containers)

    # -------------------------------------------------------------- close
    def stop_waiting(self) -> None:
        """From now on no call waits for a container: the worker is stopping.

        Calls waiting for one (every container of their function busy, no room
        to start another, or one starting) return at once as not started
        (:class:`AgentClosed`, busy), and so do calls submitted from now on.
        Calls that have won a container run on. A container handed to a
        waiting call at this moment is either taken already (the call runs)
        or given back by the call as it returns. No container is started from
        now on; one already starting may end idle.
        """
        self._no_waiting = True
        for queue in self._queues.values():
            queue.close()

    @property
    def waiting_stopped(self) -> bool:
        """:meth:`stop_waiting` (or :meth:`close`) was called: a call that has not won a
        container by now gets none."""
        return self._no_waiting

    async def close(self, grace_s: float = 30.0) -> None:
        """Refuse new calls, let running ones finish within ``grace_s``, remove everything."""
        if self._closing.is_set():
            await self._closed.wait()
            return
        self._closing.set()
        try:
            self.stop_waiting()
            await self._background.close()
            await self._launchers.close()
            await self._drain(grace_s)
            for hot, task in list(self._hot.items()):
                hot.retire("the agent is shutting down")
                if hot.state is ContainerState.START:
                    task.cancel()  # nobody waits for it any more
            if not await self._containers.join(REMOVE_TIMEOUT_S + 5.0):
                log.warning("some containers did not leave in time; cancelling them")
            await self._containers.close()
            try:
                async with asyncio.timeout(DRIVER_CLOSE_TIMEOUT_S):
                    await self.driver.close()
            except (AgentError, TimeoutError) as exc:
                log.warning("closing the container driver failed: %s", reason_of(exc))
        finally:
            self._closed.set()

    async def _drain(self, grace_s: float) -> None:
        try:
            async with asyncio.timeout(grace_s):
                await self._no_calls.wait()
        except TimeoutError:
            log.warning("grace period over: stopping %d call(s)", len(self._calls))
            for stop in list(self._calls.values()):
                stop.stop(ExecEnd.STOPPED, "the worker shut down before the call finished")
            try:
                async with asyncio.timeout(STOP_SETTLE_S):
                    await self._no_calls.wait()
            except TimeoutError:
                log.warning("%d call(s) did not stop in time", len(self._calls))
