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

1. takes a memory/CPU token: in blocking mode it waits up to one hot-poll
   interval, then tries once more without waiting; in non-blocking mode
   (``FN_ENABLE_NB_RESOURCE_TRACKER``) it tries once;
2. with a token, hands it to a new hot container and returns at once (the
   container starts in its own task; a start failure goes to the call that
   nudged);
3. without one, asks the evictor to evict idle containers of other functions
   covering the shortfall; if it evicted some, waits until they are gone and
   checks again; if not, in non-blocking mode tells the nudging call the
   server is busy, in blocking mode waits for the next nudge.

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
from worker.agent.evictor import Evictor
from worker.agent.hot import REMOVE_TIMEOUT_S
from worker.agent.resources import ResourceToken, ResourceTracker
from worker.agent.slots import Caller, ContainerState, SlotQueue

log = logging.getLogger("fnq.agent.launcher")

EVICTION_WAIT_S = REMOVE_TIMEOUT_S + 5.0
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
        self.grow_checks = settings.hot_grow_spare_mcpus > 0

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.lifetime_s):
                    caller = await self.queue.next_nudge()
            except TimeoutError:
                if self.drop_queue(self.queue):
                    return
                continue
            while await self.check_launch(caller):
                caller = self.queue.launch_owner(caller)

    async def check_launch(self, caller: Caller | None) -> bool:
        """Launch a container if needed; True if evictions made room to check again."""
        if not self.queue.new_container_needed():
            return False
        if self._held_back(asyncio.get_running_loop().time()):
            return False  # the waiting calls nudge again, every hot-poll interval
        fn = self.queue.fn
        memory_mb, cpu_mcpus = fn.memory_mb + fn.tmpfs_mb, fn.cpus_mcpu
        self.queue.move(None, ContainerState.WAIT)
        handed_over = False
        evicted: list[asyncio.Event] = []
        try:
            token = await self._token(memory_mb, cpu_mcpus)
            if token is not None:
                handed_over = True
                self.launches += 1
                self.start_container(self.queue, token, caller)
                return False
            evicted = self.evictor.evict_for(
                self.queue.key, self.tracker.shortfall(memory_mb, cpu_mcpus)
            )
            if not evicted and self.settings.enable_nb_resource_tracker:
                self._tell(caller, ServerBusy("no memory or CPU free for another container"))
        except AgentError as exc:
            self._tell(caller, exc)
        finally:
            if not handed_over:
                self.queue.move(ContainerState.WAIT, ContainerState.DONE)
        if not evicted:
            return False
        return await self._await_evictions(evicted)

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
        if not self.settings.enable_nb_resource_tracker:
            try:
                return await self.tracker.acquire(memory_mb, cpu_mcpus, timeout_s=self.hot_poll_s)
            except TimeoutError:
                pass
        return self.tracker.try_acquire(memory_mb, cpu_mcpus)

    async def _await_evictions(self, done_events: list[asyncio.Event]) -> bool:
        waits = [
            asyncio.create_task(event.wait(), name=f"fnq-eviction-wait-{i}")
            for i, event in enumerate(done_events)
        ]
        try:
            _, pending = await asyncio.wait(waits, timeout=EVICTION_WAIT_S)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if pending:
            log.warning("evicted containers of other functions are slow to go")
        return not pending

    def _tell(self, caller: Caller | None, exc: AgentError) -> None:
        if caller is None or not self.queue.fail(caller, exc):
            log.info("launch failed, no call waits for it: %s", exc)
