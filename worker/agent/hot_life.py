"""One hot container's life: start, offer idle slots, pause, leave.

::

    WAIT (launcher got no token yet) -> START -> IDLE <-> PAUSED
                                                  |  ^
                                          taken   v  | call over
                                                 BUSY  -> ... -> DONE

:meth:`HotLife.run` is the container's own task. It creates and starts
the container (a failure goes to the call that caused the launch) and
offers a slot. The calls it serves (:class:`hot.HotContainer`) take that slot
and offer the next one themselves, without this task. The container's task
only sleeps on its timers (pausing after ``FN_FREEZE_IDLE_MSECS`` of
idleness, leaving after the idle timeout) and wakes early for exit,
retirement and eviction: then it takes its own slot and leaves. Leaving
removes the container, then frees its memory and CPU, then tells the evictor
it is gone.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Self

from config.domain import Function, frozen_map, utcnow
from config.errors import AgentError, reason_of
from config.settings import Settings
from worker.agent.driver import FN_LISTENER, Container, ContainerSpec, Driver, ExitInfo
from worker.agent.errors import (
    ContainerInitFailed,
    ContainerInitTimeout,
    ImageHasVolume,
    ImageNotFound,
    ImagePullTimeout,
)
from worker.agent.evictor import Evictor
from worker.agent.pacer import FreezePacer
from worker.agent.resources import ResourceToken
from worker.agent.slots import Caller, ContainerState, Slot, SlotQueue

log = logging.getLogger("fnq.agent.hot")

# Start failures every start of the same configuration meets (see _launch_failed).
SHARED_START_FAILURES = (ImageNotFound, ImageHasVolume, ContainerInitFailed, ContainerInitTimeout)

FREEZE_TIMEOUT_S = 5.0  # docker pause / unpause
REMOVE_TIMEOUT_S = 30.0
CREATE_MARGIN_S = 60.0  # creating the container, on top of the image pull
START_MARGIN_S = 5.0  # on top of FN_HOT_START_TIMEOUT_MSECS, which the driver enforces
MIN_BUSY_NAP_S = 0.05  # see _life


def container_spec(fn: Function, container_id: str) -> ContainerSpec:
    """One container of ``fn``: its config plus the FDK variables, which config cannot change."""
    env = dict(fn.config)
    env.update(
        FN_FORMAT="http-stream",
        FN_LISTENER=FN_LISTENER,
        FN_APP_NAME=fn.app,
        FN_FN_NAME=fn.name,
        FN_APP_ID=fn.app,
        FN_FN_ID=fn.name,
        FN_MEMORY=str(fn.memory_mb),
        FN_TYPE="async",
    )
    return ContainerSpec(
        id=container_id,
        image=fn.image,
        app=fn.app,
        fn=fn.name,
        env=frozen_map(env),
        memory_mb=fn.memory_mb,
        cpus_mcpu=fn.cpus_mcpu,
        tmpfs_mb=fn.tmpfs_mb,
    )


class HotLife(abc.ABC):
    """A hot container without its calls, which :class:`hot.HotContainer` adds."""

    def __init__(
        self,
        *,
        queue: SlotQueue,
        driver: Driver,
        settings: Settings,
        token: ResourceToken,
        evictor: Evictor,
        owner: Caller | None,
        on_exit: Callable[[Self], None],
        pacer: FreezePacer | None = None,
        start_turns: asyncio.Semaphore | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.queue = queue
        self.fn: Function = queue.fn
        self.driver = driver
        self.settings = settings
        self.token = token
        self.evictor = evictor
        self.owner = owner
        self.on_exit = on_exit
        self.pacer = pacer or FreezePacer(0.0)
        self.start_turns = start_turns
        self.clock = clock  # the time of day of a call's start (Agent.clock)
        self._shared_failures_before = queue.shared_failures
        self.id = f"fnq-{secrets.token_hex(8)}"
        self.container: Container | None = None
        self.state = ContainerState.WAIT
        self.exit_info: ExitInfo | None = None
        self.retire_reason: str | None = None
        self.frozen = False
        self.calls_served = 0
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._wake = asyncio.Event()
        self._ops = asyncio.Lock()  # pause, unpause and dispatch never overlap
        self._watcher: asyncio.Task[None] | None = None
        self._slot: Slot | None = None  # offered (idle) or held by a call (busy)
        self._offers = 0  # slots offered so far
        self._seen_offers = 0  # the offer the container's task last looked at
        self._idle_since = 0.0  # loop time of the last offer
        self._sleeping_until: float | None = None  # the task's timer, while it sleeps
        self._pause_turn: float | None = None  # booked with the pacer for this idle spell
        # After a call, the first timer of the idle spell (freeze or idle timeout) is due
        # no sooner than this; the container's task naps this long while a call runs.
        freeze_s = settings.freeze_idle_s
        idle_s = float(self.fn.idle_timeout_s)
        self._first_timer_s = idle_s if freeze_s is None else min(idle_s, freeze_s)
        self.evict = evictor.register(queue.key, token.memory_mb, token.cpu_mcpus, self.wake)
        self._move(ContainerState.START)

    def __repr__(self) -> str:
        return f"<HotContainer {self.id} {self.fn.ref} {self.state}>"

    # ------------------------------------------------------------ control
    def wake(self) -> None:
        self._wake.set()

    def retire(self, reason: str) -> None:
        """Leave at the next chance (at once if idle, after the call if busy)."""
        if self.retire_reason is None:
            self.retire_reason = reason
        self.evict.leaving = True
        self.wake()

    def _move(self, new: ContainerState) -> None:
        if new is not self.state:
            self.queue.move(self.state, new)
            self.state = new

    def spec(self) -> ContainerSpec:
        return container_spec(self.fn, self.id)

    # --------------------------------------------------------------- life
    async def run(self) -> None:
        """The container's own task, from creation to removal."""
        try:
            if await self._start():
                await self._life()
        finally:
            await self._teardown()

    async def _start(self) -> bool:
        turns = self.start_turns
        try:
            if turns is None:
                await self._create_and_start()
            else:
                # No timeout: each start before this one is bounded by its own (pull,
                # start), and closing the agent cancels a start that waits its turn.
                waited = turns.locked()
                async with turns:
                    if waited and self.queue.calls_without_container() == 0:
                        log.debug("a start of %s is dropped: every call has a container",
                                  self.fn.ref)  # fmt: skip
                        return False
                    await self._create_and_start()
        except AgentError as exc:
            self._launch_failed(exc)
            return False
        except Exception as exc:  # a driver fault must reach the waiting call, not kill us
            log.exception("driver failed to start a container of %s", self.fn.ref)
            self._launch_failed(ContainerInitFailed(f"the container could not start: {exc}"))
            return False
        self.owner = None  # launch errors are over; do not keep the caller alive
        self._watcher = asyncio.create_task(self._watch_exit(), name=f"fnq-exit-{self.id}")
        return True

    async def _create_and_start(self) -> None:
        pull_s = self.settings.secs("hot_pull_timeout_msecs")
        start_s = self.settings.secs("hot_start_timeout_msecs")
        try:
            async with asyncio.timeout(pull_s + CREATE_MARGIN_S):
                self.container = await self.driver.create(self.spec())
        except TimeoutError:
            raise ImagePullTimeout(
                f"preparing image {self.fn.image} took longer than {pull_s:.0f} s"
            ) from None
        try:
            async with asyncio.timeout(start_s + START_MARGIN_S):
                await self.container.start()
        except TimeoutError:
            raise ContainerInitTimeout(
                f"the function did not open its socket within {start_s:.0f} s"
            ) from None

    def _launch_failed(self, exc: AgentError) -> None:
        """The call that caused the launch gets the error. So does every other call
        waiting for a container of this configuration when the error is one that
        every start of it would meet (its image, its function's start) and none of
        its containers is up: each call would only see its own start fail
        alike, a few start turns after another. (Starts of it still waiting for a
        turn are then dropped: no call waits for them.)"""
        owner = self.queue.launch_owner(self.owner)
        told = owner is not None and self.queue.fail(owner, exc)
        if isinstance(exc, SHARED_START_FAILURES) and self.queue.serving_containers() == 0:
            others = self.queue.fail_waiting(exc)
            if others:
                log.info("container of %s failed to start: %d more waiting call(s) end "
                         "with it: %s", self.fn.ref, others, exc)  # fmt: skip
            told = told or others > 0
            if told:
                self.queue.shared_failures += 1
        if told:
            return
        if self.queue.shared_failures > self._shared_failures_before:
            # Started beside one whose error already ended the calls it was for.
            log.info("another container of %s failed to start: %s", self.fn.ref, exc)
        else:
            log.warning("container of %s failed to start, no call waits: %s", self.fn.ref, exc)

    async def _watch_exit(self) -> None:
        assert self.container is not None
        try:
            # No timeout: this wait spans the container's life; teardown cancels it.
            info = await self.container.wait()
        except AgentError as exc:
            info = ExitInfo(exit_code=None, error=str(exc))
        self.exit_info = info
        if not self._exited.done():
            self._exited.set_result(None)
        self.wake()

    async def _life(self) -> None:
        """Sleep until a timer or an event needs the container; calls come and go meanwhile.

        A call takes the offered slot without waking this task and offers the
        next one itself when it is over (:meth:`_release`), so a steady stream
        of calls costs this task nothing: it wakes for the freeze and idle
        timers (and moves them on if calls came), and for exit, retirement
        and eviction. While a call holds the container the task naps for the
        freeze time or the idle timeout, whichever is shorter: neither is due
        sooner than that after the call ends. Waiting for the release instead
        would wake it at every call of a steady stream, only to find the next
        call holding the container already. A release wakes it when one of
        them comes due before the nap ends (a nap is at least MIN_BUSY_NAP_S).
        """
        loop = asyncio.get_running_loop()
        freeze_s = self.settings.freeze_idle_s
        idle_s = float(self.fn.idle_timeout_s)
        busy_nap_s = max(self._first_timer_s, MIN_BUSY_NAP_S)
        self._offer()
        while True:
            slot = self._slot
            if slot is None:
                return  # the last call found the container unfit to go on
            now = loop.time()
            if slot.taken:
                await self._sleep_until(now + busy_nap_s)
                continue
            # Waiting calls get one turn at a fresh slot before it freezes or times out.
            fresh = self._offers != self._seen_offers
            self._seen_offers = self._offers
            reason = self._leave_reason(not fresh and now >= self._idle_since + idle_s)
            if reason is not None:
                if slot.try_take():
                    self._slot = None
                    self.retire(reason)
                    log.debug("container %s of %s leaves: %s", self.id, self.fn.ref, reason)
                    return
                continue  # a call won the race: it serves (a dead container refuses it)
            freeze_at = None
            if freeze_s is not None and not self.frozen:
                # Counted from the function's last call too: while it gets calls, a
                # spare container stays thawed (and retires at its idle timeout).
                freeze_at = max(self._idle_since, self.queue.last_used_s) + freeze_s
            if freeze_at is not None and not fresh and now >= freeze_at:
                if self._pause_turn is None:
                    self._pause_turn = self.pacer.book(now)
                if now >= self._pause_turn:
                    await self._freeze(slot)
                    continue
                freeze_at = self._pause_turn  # other containers pause first
            wake_at = self._idle_since + idle_s
            if freeze_at is not None:
                wake_at = min(wake_at, freeze_at)
            await self._sleep_until(wake_at)

    async def _sleep_until(self, when: float) -> None:
        self._wake.clear()
        self._sleeping_until = when
        try:
            async with asyncio.timeout_at(when):
                await self._wake.wait()
        except TimeoutError:
            pass
        finally:
            self._sleeping_until = None

    @abc.abstractmethod
    def _offer(self) -> None:
        """Offer the next idle slot: callers may take it, the evictor may claim it."""

    def _leave_reason(self, idle_expired: bool) -> str | None:
        if self.exit_info is not None:
            return self.exit_info.describe(self.fn.memory_mb)
        if self.retire_reason is not None:
            return self.retire_reason
        if self.evict.requested:
            return "evicted to make room for another function"
        return "idle timeout" if idle_expired else None

    async def _freeze(self, slot: Slot) -> None:
        async with self._ops:
            if slot.taken or self.container is None:
                return
            try:
                async with asyncio.timeout(FREEZE_TIMEOUT_S):
                    await self.container.pause()
            except (AgentError, TimeoutError) as exc:
                self.retire(f"pausing the container failed: {reason_of(exc)}")
                return
            self.frozen = True
            if not slot.taken:
                self._move(ContainerState.PAUSED)

    async def _teardown(self: Self) -> None:
        try:
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)
            if self.container is not None:
                await self._remove(self.container)
        finally:  # whatever the removal did, the container's memory and CPU are free
            self.token.close(heir=self.evict.heir)  # for the launch it made room for
            self.evictor.unregister(self.evict)
            self._move(ContainerState.DONE)
            self.on_exit(self)

    async def _remove(self, container: Container) -> None:
        try:
            async with asyncio.timeout(REMOVE_TIMEOUT_S):
                await container.remove()
        except (AgentError, TimeoutError) as exc:
            log.warning("removing container %s failed: %s", self.id, reason_of(exc))
        except Exception:  # a driver fault: the rest of the teardown must still happen
            log.exception("removing container %s failed", self.id)
