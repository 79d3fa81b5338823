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
ends within its own timeouts, and gets its container or its error.

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
driver says how many containers must go); if not enough are idle, the start
meets the shortage and the call goes back to the queue. A call whose
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

from config.domain import CALL_ID_RE, Call, Function, Outcome, headers_problem
from config.errors import AgentError
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
from worker.agent.hot import HotContainer, SlotUnusable
from worker.agent.hot_life import REMOVE_TIMEOUT_S
from worker.agent.launcher import Launcher
from worker.agent.logbuf import LogBuffer
from worker.agent.pacer import FreezePacer
from worker.agent.resources import ResourceToken, ResourceTracker
from worker.agent.slots import Caller, ContainerState, RequestState, Slot, SlotQueue, slot_key
from worker.agent.stats import AgentStats, QueueStats
from worker.agent.tasks import TaskSet

log = logging.getLogger("fnq.agent")

STOP_SETTLE_S = 10.0  # after the grace, how long stopped calls get to wind down
PREFER_THAWED_S = 0.005  # see _get_slot
DRIVER_CLOSE_TIMEOUT_S = 60.0
KEY_CACHE_SIZE = 1024  # Function objects whose slot key is remembered
IMAGE_CHECK_S = 2.0  # how often the images of live containers are looked up again


class Agent:
    def __init__(
        self,
        settings: Settings,
        driver: Driver,
        tracker: ResourceTracker | None = None,
        cpu: CpuGauge | None = None,
        cpu_split: CpuSplit | None = None,
    ) -> None:
        self.settings = settings
        self.driver = driver
        self.tracker = tracker or ResourceTracker.from_host(settings)
        self.evictor = Evictor(on_idle_change=self.tracker.lent_changed)
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
            return not_started_outcome(AgentClosed())
        if call.id in self._calls:
            return not_started_outcome(ServerBusy(f"call {call.id} is already running here"))
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

    async def _submit(self, call: Call, fn: Function, stop: StopControl) -> Outcome:
        if not CALL_ID_RE.fullmatch(call.id):  # it goes into the request's head as it is
            return not_started_outcome(InvalidCall(f"call id {call.id[:80]!r} is not valid"))
        if call.headers and (problem := headers_problem(call.headers)) is not None:
            return not_started_outcome(InvalidCall(f"call {call.id}: {problem}"))
        memory_mb, cpu_mcpus = fn.memory_mb + fn.tmpfs_mb, fn.cpus_mcpu
        if not self.tracker.is_possible(memory_mb, cpu_mcpus):
            too_big = self.tracker.too_big(memory_mb, cpu_mcpus)
            return not_started_outcome(ResourceTooBig(f"{fn.ref} {too_big}"))
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
                return not_started_outcome(exc)
            if slot is None:
                if stop.end is ExecEnd.CANCELLED:
                    return cancelled_outcome(stop.reason)
                return not_started_outcome(AgentClosed())
            queue.requests[RequestState.EXEC] += 1
            taken_at = time.perf_counter()  # uvloop's loop.time() counts whole ms
            try:
                run = await slot.hot.serve(slot, call, fn.timeout_s, buffer.write, stop)
            except SlotUnusable as exc:
                log.debug("call %s: container unusable before dispatch (%s)", call.id, exc)
                continue
            except HostShort as exc:  # nothing reached the container: back to the queue
                return not_started_outcome(exc)
            except NotAccepted as exc:  # nothing ran; its stuck container is retired
                log.warning("call %s: %s", call.id, exc)
                return not_started_outcome(exc)
            finally:
                queue.requests[RequestState.EXEC] -= 1
            queue.held(time.perf_counter() - taken_at, loop.time())
            self.cpu.touch()
            return ran_outcome(run, buffer, slot.hot.id, fn.image)

    async def _get_slot(
        self, queue: SlotQueue, call_id: str, deadline: float, stop: StopControl
    ) -> Slot | None:
        """Wait for an idle slot; None if the call was stopped while waiting."""
        if self._no_waiting:  # a call back from an unusable container, say
            raise AgentClosed()
        if not stop.requested:
            busy = queue.containers[ContainerState.BUSY] > 0
            slot = queue.take_idle(thawed_only=busy)
            if slot is not None:  # the usual case under load: no waiting at all
                return slot
        caller = Caller(call_id)
        queue.join(caller)
        stop.waker = caller.wake.set
        try:
            return await self._wait_for_slot(queue, caller, deadline, stop)
        finally:
            stop.waker = None
            queue.leave(caller)
            if caller.slot is not None:  # handed over as the call gave up waiting
                caller.slot.hot.give_back(caller.slot)

    async def _wait_for_slot(
        self, queue: SlotQueue, caller: Caller, deadline: float, stop: StopControl
    ) -> Slot | None:
        """The waiting part of :meth:`_get_slot`, as ``caller`` in ``queue``."""
        loop = asyncio.get_running_loop()
        joined = loop.time()
        next_nudge = joined + max(queue.launch_patience_s(), stop.launch_patience_s)
        # Unpausing costs about 13 ms; a busy container of a short function is free
        # again sooner. Only paused ones idle: wait a moment for a running one.
        thawed_until = joined + PREFER_THAWED_S
        while True:
            # A slot handed over meanwhile goes back (in _get_slot) if the call stops
            # waiting here: the checks come before the slot is looked at.
            if stop.requested:
                return None
            if self._no_waiting:
                raise AgentClosed()
            slot = caller.slot
            if slot is not None:  # an offer handed it over
                caller.slot = None
                return slot
            if caller.error is not None:
                raise caller.error
            now = loop.time()
            prefer_thawed = now < thawed_until and queue.containers[ContainerState.BUSY] > 0
            slot = queue.take_idle(thawed_only=prefer_thawed)
            if slot is not None:
                return slot
            # Past its timeout a call still waits for a container being started (the
            # start is bounded by its own timeouts): giving up would waste the start,
            # and a function that never starts would come back as busy forever.
            starting = queue.containers[ContainerState.START] > 0
            if now >= deadline and not starting:
                raise ServerBusy(
                    f"no container of {queue.fn.ref} became free within "
                    f"{queue.fn.timeout_s} s: server too busy"
                )
            if now >= next_nudge:
                queue.nudge(caller)
                next_nudge = now + self.hot_poll_s
            caller.wake.clear()
            wake_at = next_nudge if now >= deadline else min(deadline, next_nudge)
            if prefer_thawed and queue.idle_slots:
                wake_at = min(wake_at, thawed_until)
            try:
                async with asyncio.timeout_at(wake_at):
                    await caller.wake.wait()
            except TimeoutError:
                pass

    # ------------------------------------------------------ queues, launch
    def _slot_key(self, fn: Function) -> str:
        """``slot_key(fn)``, remembered per Function object (callers reuse theirs)."""
        known = self._keys.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.clear()
        key = slot_key(fn)
        self._keys[id(fn)] = (fn, key)  # holding fn keeps its id from being reused
        self._retire_superseded(fn, key)
        return key

    def functions(self) -> set[tuple[str, str]]:
        """The functions (app, name) this agent has containers of."""
        return {(hot.fn.app, hot.fn.name) for hot in self._hot}

    def definition_read(self, app: str, name: str, fn: Function | None) -> None:
        """The registry's definition of function ``app``/``name`` as just read (None: it
        is not registered): the containers of its other definitions leave, and all of
        its containers when it is gone (idle ones at once, busy ones after their call)."""
        if fn is not None:
            self._retire_superseded(fn, slot_key(fn))
            return
        self._newest.pop((app, name), None)
        retired = 0
        for hot in list(self._hot):
            if hot.fn.app == app and hot.fn.name == name and hot.retire_reason is None:
                hot.retire("its function was deleted")
                retired += 1
        if retired:
            log.info("%d container(s) of %s/%s retired: the function was deleted",
                     retired, app, name)  # fmt: skip

    def _retire_superseded(self, fn: Function, key: str) -> None:
        """``fn`` is a definition of its function newer than any seen so far (by its
        ``updated_at``) with another slot key: retire the containers of the function's
        other definitions, idle ones at once, busy ones once their call is over. No
        call of this worker asks for them any more but those that looked the
        function up before the change. (A definition as old as the newest one, or
        older, changes nothing: that of a call that looked it up earlier.)"""
        if fn.updated_at is None:
            return
        ref = (fn.app, fn.name)
        newest = self._newest.get(ref)
        if newest is not None and newest[0] >= fn.updated_at:
            return
        self._newest[ref] = (fn.updated_at, key)
        if newest is None or newest[1] == key:
            return
        retired = 0
        for hot in list(self._hot):
            if (
                hot.queue.key != key
                and hot.fn.app == fn.app
                and hot.fn.name == fn.name
                and hot.retire_reason is None
            ):
                hot.retire("its function's definition changed")
                retired += 1
        if retired:
            log.info("%d container(s) of %s retired: the function's definition changed",
                     retired, fn.ref)  # fmt: skip

    def _queue_for(self, fn: Function) -> SlotQueue:
        key = self._slot_key(fn)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = SlotQueue(key, fn)
            launcher = Launcher(
                queue,
                settings=self.settings,
                tracker=self.tracker,
                evictor=self.evictor,
                start_container=self._start_container,
                drop_queue=self._drop_queue,
                cpu=self.cpu,
                worker_containers=self._hot.__len__,
                in_the_way=self.driver.containers_in_the_way,
            )
            self._launchers.spawn(launcher.run(), name=f"fnq-launcher-{fn.ref}-{key[:8]}")
        queue.last_used_s = self.loop.time()
        return queue

    def _drop_queue(self, queue: SlotQueue) -> bool:
        if not queue.is_idle():
            return False
        if self._queues.get(queue.key) is queue:
            del self._queues[queue.key]
        return True

    def _start_container(
        self, queue: SlotQueue, token: ResourceToken, owner: Caller | None
    ) -> None:
        if self._no_waiting:  # no call would take it
            token.close()
            queue.move(ContainerState.WAIT, ContainerState.DONE)
            return
        hot = HotContainer(
            queue=queue,
            driver=self.driver,
            settings=self.settings,
            token=token,
            evictor=self.evictor,
            owner=owner,
            on_exit=self._forget_container,
            pacer=self.pacer,
            start_turns=self.start_turns,
        )
        queue.containers_started += 1
        self._hot[hot] = self._containers.spawn(hot.run(), name=f"fnq-container-{hot.id}")

    def _forget_container(self, hot: HotContainer) -> None:
        self._hot.pop(hot, None)

    # ------------------------------------------------------------- images
    async def _watch_images(self) -> None:
        while True:
            await asyncio.sleep(IMAGE_CHECK_S)
            await self.retire_replaced_images()

    async def retire_replaced_images(self) -> int:
        """Retire the containers made from an image that their function's image name no
        longer stands for (rebuilt under the same tag, or pulled anew): idle ones at
        once, busy ones once their call is over. The calls after them get containers
        of the image the name stands for now. How many were retired."""
        live = [hot for hot in self._hot if hot.container is not None and hot.retire_reason is None]
        if not live:
            return 0
        try:
            now = await self.driver.image_ids({hot.fn.image for hot in live})
        except AgentError as exc:
            log.debug("looking up the images of the containers failed: %s", exc)
            return 0
        retired = 0
        for hot in live:
            assert hot.container is not None
            made_from, current = hot.container.image_id, now.get(hot.fn.image)
            if made_from is None or current is None or made_from == current:
                continue
            hot.retire(f"image {hot.fn.image} now stands for another image")
            retired += 1
            log.info("container %s of %s is retired: image %s was rebuilt or pulled anew",
                     hot.id, hot.fn.ref, hot.fn.image)  # fmt: skip
        return retired

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
                log.warning("closing the container driver failed: %s", exc or "timed out")
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
