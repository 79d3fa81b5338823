"""The launcher of one slot queue: starts containers when waiting calls need them.

Waiting calls nudge the launcher (at once, or after about one call's time while
a container of the queue is busy; then every ``FN_HOT_POLL_MSECS``).
On each nudge it asks the queue whether a container is needed (waiting calls
that have nudged outnumber idle plus starting containers; one start at a time
while the queue's calls are short and a container is busy). While the calls
are short and the busy containers keep coming free, it starts none beyond two
per CPU in the worker (counting every function's) unless those containers were
busy at least ``LAUNCH_BUSY_SHARE`` of the last quarter second (below that, a
waiting call is only waiting its turn for a moment, and a start would take CPU
from the calls for nothing) and the CPU gauge (:mod:`cpu`) says the host and
the worker have CPU to spare for it.
If needed:

0. if the host has no room for another container (the driver counts the
   worker's file descriptors and the inodes for socket directories, and says
   how many containers must go first), asks the evictor to evict that many idle
   containers of other functions (their room going to its ticket, if it holds
   one), waits until they are gone and checks again. The descriptors counted
   include those of the worker's containers still starting (or waiting for
   their turn to start), each taking a start's full share until it is up or
   has failed: launches at once do not all pass on the same free room. If
   there are not that many idle containers, it waits while other containers
   are starting (checking again at the next nudge: once they are up, idle ones
   can go, and their count is exact); with none starting it goes on, and the
   start meets the shortage (its call goes back to the queue,
   :mod:`drivers.shortage`);
1. takes a memory/CPU token: in blocking mode through a ticket, its place in
   the tracker's line (:mod:`resources`), which it keeps from one check to the
   next while the launch is needed, and waits up to one hot-poll interval for
   it to be granted; in non-blocking mode (``FN_ENABLE_NB_RESOURCE_TRACKER``)
   it tries once;
2. with a token, hands it to a new hot container and returns at once (the
   container starts in its own task; a start failure goes to the call that
   nudged);
3. without one, asks the evictor to evict idle containers of other functions
   covering the shortfall, their room going to its ticket; if it evicted
   some, waits until they are gone and checks again; if not, in non-blocking
   mode tells the nudging call the server is busy; in blocking mode, if the
   function has no container at all and its ticket has waited
   ``FN_HOT_DISPLACE_WAIT_PERCENT`` of the function's timeout (the time its
   calls wait for a container), asks busy containers of other functions to
   leave after their call, their room going to its ticket (:mod:`evictor`);
   then it waits for the next nudge.

While it holds a ticket, the launcher checks again at least every hot-poll
interval, and at once when the ticket is granted; a ticket no waiting call
needs any more leaves the line (a token granted to it meanwhile goes back).
A launcher that has not been nudged for ``max(FN_HOT_LAUNCHER_TIMEOUT_MSECS,
2 x idle timeout)`` ends and drops its queue, if the queue has nothing left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from config.errors import AgentError
from config.settings import Settings
from worker.agent.cpu import FREE_PER_CPU, CpuGauge, cpu_count
from worker.agent.errors import ServerBusy
from worker.agent.evictor import Evictor, wait_gone
from worker.agent.hot import EVICTION_WAIT_S
from worker.agent.resources import ResourceTicket, ResourceToken, ResourceTracker, Shortfall
from worker.agent.slots import Caller, ContainerState, SlotQueue

log = logging.getLogger("fnq.agent.launcher")

LAUNCH_BUSY_SHARE = 0.75  # see _held_back

StartContainer = Callable[[SlotQueue, ResourceToken, Caller | None], None]


class Launcher:
    def __init__(
        self,
        queue: SlotQueue,
        *,
        settings: Settings,
        tracker: ResourceTracker,
        evictor: Evictor,
        start_container: StartContainer,
        drop_queue: Callable[[SlotQueue], bool],
        cpu: CpuGauge,
        free_containers: int | None = None,
        worker_containers: Callable[[], int] | None = None,
        in_the_way: Callable[[], int] | None = None,
    ) -> None:
        self.queue = queue
        self.cpu = cpu
        self.settings = settings
        self.tracker = tracker
        self.evictor = evictor
        self.start_container = start_container
        self.drop_queue = drop_queue
        self.hot_poll_s = settings.secs("hot_poll_msecs")
        self.lifetime_s = max(
            settings.secs("hot_launcher_timeout_msecs"), 2.0 * queue.fn.idle_timeout_s
        )
        self.launches = 0
        # containers of the worker that grow without a look at the load (two per CPU)
        self.free_containers = (
            FREE_PER_CPU * cpu_count() if free_containers is None else free_containers
        )
        self.worker_containers = worker_containers or queue.live_containers
        # containers that must go before the host has room for another (the driver's)
        self.in_the_way = in_the_way or (lambda: 0)
        self.grow_checks = settings.hot_grow_spare_mcpus > 0
        # how long a launch of a function without a container waits before it displaces
        self.displace_after_s = settings.hot_displace_wait_percent / 100 * queue.fn.timeout_s
        self.ticket: ResourceTicket | None = None  # the launch's place in the tracker's line
        self._host_wait = False  # waiting for starts under way to leave room on the host
        self._awaiting_grant = False

    async def run(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self._nudge_wait_s()):
                        caller = await self.queue.next_nudge()
                except TimeoutError:
                    if self.ticket is not None:  # is the launch still needed?
                        caller = self.queue.launch_owner(None)
                    elif self.drop_queue(self.queue):
                        return
                    else:
                        continue
                while await self.check_launch(caller):
                    caller = self.queue.launch_owner(caller)
        finally:
            self._drop_ticket()

    def _nudge_wait_s(self) -> float:
        return self.lifetime_s if self.ticket is None else self.hot_poll_s

    def _drop_ticket(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.withdraw()

    async def check_launch(self, caller: Caller | None) -> bool:
        """Launch a container if needed; True if evictions made room to check again."""
        if not self.queue.new_container_needed():
            self._drop_ticket()
            return False
        if self._held_back(asyncio.get_running_loop().time()):
            self._drop_ticket()
            return False  # the waiting calls nudge again, every hot-poll interval
        fn = self.queue.fn
        memory_mb, cpu_mcpus = fn.memory_mb + fn.tmpfs_mb, fn.cpus_mcpu
        self.queue.move(None, ContainerState.WAIT)
        handed_over = False
        evicted: list[asyncio.Event] | None = []
        try:
            evicted = self._make_host_room()  # if any: checked again once they are gone
            if evicted is None:
                return False  # starts under way hold the room: checked at the next nudge
            if not evicted:
                token = await self._token(memory_mb, cpu_mcpus)
                if token is not None:
                    handed_over = True
                    self.launches += 1
                    self.start_container(self.queue, token, caller)
                    return False
                evicted = self._make_room(caller, memory_mb, cpu_mcpus)
        except AgentError as exc:
            self._drop_ticket()
            self._tell(caller, exc)
        finally:
            if not handed_over:
                self.queue.move(ContainerState.WAIT, ContainerState.DONE)
        if not evicted:
            return False
        return await wait_gone(evicted, EVICTION_WAIT_S)

    def _make_host_room(self) -> list[asyncio.Event] | None:
        """Evict as many idle containers of other functions as must go for the host to
        have room for another container (descriptors, inodes) beside those starting,
        or none if there are not that many; their memory and CPU go to the launch's
        ticket, if it holds one. The events of the evicted ones, set once each is
        gone; None if none could go while containers are starting: the launch waits
        for them."""
        need = self.in_the_way()
        if need <= 0:
            self._host_wait = False
            return []
        evicted: list[asyncio.Event] = []
        if not self._leaves_idle_room():
            evicted = self.evictor.evict_for(self.queue.key, Shortfall(0, 0, need), self.ticket)
        if evicted:
            log.debug("%d idle container(s) of other functions evicted: the host has no "
                      "room for another container of %s", len(evicted),
                      self.queue.fn.ref)  # fmt: skip
            return evicted
        starting = self.evictor.starting
        if starting <= 0:
            self._host_wait = False
            return []
        if not self._host_wait:
            self._host_wait = True
            log.debug("a launch of %s waits: the host has no room for another container "
                      "while %d container(s) start", self.queue.fn.ref, starting)  # fmt: skip
        return None

    def _make_room(
        self, caller: Caller | None, memory_mb: int, cpu_mcpus: int
    ) -> list[asyncio.Event]:
        """No memory or CPU token yet: evict idle containers of other functions, or
        (blocking mode) displace busy ones; non-blocking, the call is told the worker
        is busy when nothing can be evicted. The events of the evicted containers."""
        need = self.tracker.shortfall(memory_mb, cpu_mcpus, self.ticket)
        evicted: list[asyncio.Event] = []
        if not self._leaves_idle_room():
            evicted = self.evictor.evict_for(self.queue.key, need, self.ticket)
        if not evicted and self.settings.enable_nb_resource_tracker:
            self._tell(caller, ServerBusy("no memory or CPU free for another container"))
        elif not evicted:
            evicted = self._displace(need)
        return evicted

    def _leaves_idle_room(self) -> bool:
        """While a function without a container waits, the idle room of other functions
        is left to it by launches of functions that have one. (A call short of
        descriptors for a connection evicts all the same: the room goes to that
        function, see :meth:`Evictor.evict_for_connection`.)"""
        return self._has_container() and self.tracker.starving()

    def _has_container(self) -> bool:
        """The function has a container up or starting (its calls do not starve)."""
        queue = self.queue
        return bool(queue.serving_containers() or queue.containers[ContainerState.START])

    def _displace(self, need: Shortfall) -> list[asyncio.Event]:
        """A function without a container whose launch has waited long enough for room
        takes it from containers of other functions: idle ones leave at once, busy ones
        after their call, and their room goes to its ticket. The events of the idle
        ones, set once each is gone."""
        ticket = self.ticket
        if ticket is None or ticket.starving_since is None or self.displace_after_s <= 0:
            return []
        if asyncio.get_running_loop().time() - ticket.starving_since < self.displace_after_s:
            return []
        evicted, asked = self.evictor.displace_for(self.queue.key, need, ticket)
        if asked:
            log.info("%d busy container(s) of other functions will leave after their "
                     "call to make room for %s", asked, self.queue.fn.ref)  # fmt: skip
        return evicted

    def _held_back(self, now: float) -> bool:
        """A short function whose containers keep coming free, in a worker past two
        containers per CPU (of all its functions), gets another only while they are
        busy most of the time (the calls wait for them, not for a moment's turn) and
        the host has CPU for it. A function without a container is never held back:
        none of its containers comes free."""
        queue = self.queue
        live = max(queue.live_containers(), self.worker_containers())
        return (
            self.grow_checks
            and live >= self.free_containers
            and queue.short_calls_cycling(now)
            and (queue.busy_share(now) < LAUNCH_BUSY_SHARE or self.cpu.saturated(live))
        )

    async def _token(self, memory_mb: int, cpu_mcpus: int) -> ResourceToken | None:
        """A token now or within one hot-poll interval; None if there is none yet (a
        blocking launch keeps its ticket in the line meanwhile)."""
        if self.settings.enable_nb_resource_tracker:
            return self.tracker.try_acquire(memory_mb, cpu_mcpus)
        ticket = self.ticket
        if ticket is None:
            ticket = self.ticket = self.tracker.request(memory_mb, cpu_mcpus, self._granted)
        if self._has_container():
            ticket.starving_since = None
        elif ticket.starving_since is None:
            ticket.starving_since = asyncio.get_running_loop().time()
        if not ticket.granted.is_set():
            self._awaiting_grant = True
            try:
                async with asyncio.timeout(self.hot_poll_s):
                    await ticket.granted.wait()
            except TimeoutError:
                if not ticket.granted.is_set():
                    return None
            finally:
                self._awaiting_grant = False
        self.ticket = None
        return ticket.take()

    def _granted(self) -> None:
        """The ticket was granted: if not while the launcher waits for it, between
        checks, a check at once."""
        if not self._awaiting_grant:
            self.queue.poke()

    def _tell(self, caller: Caller | None, exc: AgentError) -> None:
        if caller is None or not self.queue.fail(caller, exc):
            log.info("launch failed, no call waits for it: %s", exc)
