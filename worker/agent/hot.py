"""One hot container: its life (hot_life) and the calls it serves.

A call takes the slot the container offers, runs :meth:`HotContainer.serve`
in its own task and, when it is over, offers the next slot itself, so the
next call finds the container at once.

A call that finds its container broken before dispatch (exited, failed to
unpause, or its socket takes no connection and the container turns out to be
dead, its exit not reported yet) gets :class:`SlotUnusable` and looks for
another slot: nothing ran. A live container whose socket refuses the call
fails it as the function's error. Which of the two a refusal is, a driver
that watches the container's process tells with the refusal
(``NotDelivered.exited``); for one that does not, the call waits up to
EXIT_SETTLE_S for the engine's report of an exit. One whose function never accepts the
call's connection within the call's timeout is retired, and the call ends
unstarted (:class:`NotAccepted`), the function's failure: it never reached
the function, whose container failed it as one that never starts does.
A call whose container needs a new connection (the kept-alive one lapsed or
broke) and finds the host short of descriptors for it evicts idle containers
of other functions, as a launch does, and tries once more; then, or if none
could go, it goes back to the queue (:class:`HostShort`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from config.domain import Call, utcnow
from config.errors import AgentError, reason_of
from worker.agent.driver import (
    CallUsage,
    Container,
    DispatchRequest,
    DispatchResult,
    OutputSink,
)
from worker.agent.errors import (
    DispatchError,
    ExchangeBroken,
    HostShort,
    InvalidResponse,
    NotAccepted,
    NotDelivered,
    ResponseTooBig,
)
from worker.agent.evictor import wait_gone
from worker.agent.execution import KEEP_STATUSES, ExecEnd, ExecResult, StopControl
from worker.agent.hot_life import FREEZE_TIMEOUT_S, REMOVE_TIMEOUT_S, HotLife
from worker.agent.slots import ContainerState, Slot
from worker.agent.tasks import Interrupted, interruptible

log = logging.getLogger("fnq.agent.hot")

EXIT_SETTLE_S = 0.5  # a dropped connection is often a death: wait this long for the exit
# (unless the driver has watched the process already: ExchangeBroken.exited,
# NotDelivered.exited)

# A driver ends a dispatch at the call's timeout itself (TimeoutError, or NotAccepted when
# the function never took the connection); the agent's own timer, this much later, ends
# one whose driver does not.
DISPATCH_BACKSTOP_S = 1.0
# How long a launch, or a call short of room for its connection (at most its timeout),
# waits for the containers evicted for it to go.
EVICTION_WAIT_S = REMOVE_TIMEOUT_S + 5.0


class SlotUnusable(Exception):
    """The container broke before the call reached it; the call may try another slot."""


class HotContainer(HotLife):
    """A hot container of one function configuration, and the calls it serves."""

    # ------------------------------------------------------ slot handover
    def _offer(self) -> None:
        """Offer the next idle slot: callers may take it, the evictor may claim it."""
        self._slot = self.queue.offer(self)
        self._offers += 1
        self._idle_since = self._loop.time()
        self._pause_turn = None
        self._move(ContainerState.PAUSED if self.frozen else ContainerState.IDLE)
        self.evictor.enable(self.evict)

    def give_back(self, slot: Slot) -> None:
        """``slot`` was handed to a call that stopped waiting before it used it."""
        if self._slot is slot:
            self._release()

    def _release(self) -> None:
        """The call is over: offer the container again at once, or let it leave (also
        when it was displaced for a launch that still waits)."""
        if self.retire_reason is None and self.exit_info is None and not self.evict.requested:
            if self.evictor.leaves_after_call(self.evict):
                self.retire("displaced to make room for a function without a container")
                self._slot = None
                return
            self._offer()
            until = self._sleeping_until
            if until is not None and self._idle_since + self._first_timer_s < until:
                self._wake.set()  # it sleeps past the moment it may have to freeze or leave
        else:
            self._slot = None
            self._wake.set()

    # -------------------------------------------------------------- calls
    async def serve(
        self, slot: Slot, call: Call, timeout_s: float, sink: OutputSink, stop: StopControl
    ) -> ExecResult:
        """Run one call on this container (in the caller's task).

        The container is offered to the next call as soon as this one has its
        answer; the call's log is complete when this returns.
        """
        try:
            async with self._ops:
                if stop.requested:
                    raise SlotUnusable("the call was stopped before it was dispatched")
                await self._ready_for_call()
                assert self.container is not None
                self.evictor.disable(self.evict)
                self._move(ContainerState.BUSY)
                self.calls_served += 1
                run = await self._exec(self.container, call, timeout_s, stop, sink)
        finally:
            self._release()
        if run.result is not None and run.result.output_done is not None:
            # The driver bounds this wait (a marker that does not come back is given up).
            await run.result.output_done
        return run

    async def _ready_for_call(self) -> None:
        if self.exit_info is not None:
            raise SlotUnusable(self.exit_info.describe(self.fn.memory_mb))
        if self.retire_reason is not None or self.container is None:
            raise SlotUnusable(self.retire_reason or "no container")
        if self.frozen:
            try:
                async with asyncio.timeout(FREEZE_TIMEOUT_S):
                    await self.container.unpause()
            except (AgentError, TimeoutError) as exc:
                self.retire(f"unpausing the container failed: {reason_of(exc)}")
                raise SlotUnusable(self.retire_reason or "unpause failed") from exc
            self.frozen = False

    async def _exec(
        self,
        container: Container,
        call: Call,
        timeout_s: float,
        stop: StopControl,
        sink: OutputSink,
    ) -> ExecResult:
        room_made = False
        while True:
            started_at, started_s = self.clock(), time.monotonic()
            request = DispatchRequest(
                call_id=call.id,
                body=call.body,
                headers=call.headers,
                # by this host's clock, which the container reads
                deadline=utcnow() + timedelta(seconds=timeout_s),
                timeout_s=timeout_s,
            )
            usage = CallUsage()
            try:
                end, result, error = await self._dispatch(
                    container, request, sink, usage, stop=stop, timeout_s=timeout_s
                )
            except HostShort:  # no new connection: tried once more if room was made
                if room_made or not await self._make_host_room(stop, timeout_s):
                    raise
                room_made = True
                if stop.requested:
                    raise SlotUnusable("the call was stopped before it was dispatched") from None
                continue
            # Its length by the monotonic clock: a step of the wall clock meanwhile
            # is not part of the run.
            ended_at = started_at + timedelta(seconds=time.monotonic() - started_s)
            return ExecResult(
                end, started_at, ended_at, result=result, error=error, stats=usage.stats
            )

    async def _make_host_room(self, stop: StopControl, timeout_s: float) -> bool:
        """The host had no room for a new connection to the function (its kept-alive one
        lapsed or broke): evict as many idle containers of other functions as the
        driver says must go for the host to have room, or none if there are not that
        many, as a launch does, and wait until they are gone (or the call is
        stopped, or ``timeout_s``, the call's timeout, has passed, as a call waits
        for a container no longer). Whether any were evicted.

        Unlike a launch of a function that has a container, it evicts even while a
        function without one waits for room: the connection takes none of their
        memory or CPU, which is held for that function's launch (evictor), and
        leaving them would only send this call back to the queue."""
        need = self.driver.containers_in_the_way(connection=True)
        if need <= 0:
            return False
        evicted = self.evictor.evict_for_connection(self.queue.key, need)
        if not evicted:
            return False
        log.debug("%d idle container(s) of other functions evicted: the host has no room "
                  "for a connection to %s", len(evicted), self.id)  # fmt: skip
        await wait_gone(evicted, min(EVICTION_WAIT_S, timeout_s), stop.stopped)
        return True

    async def _dispatch(
        self,
        container: Container,
        request: DispatchRequest,
        sink: OutputSink,
        usage: CallUsage,
        *,
        stop: StopControl,
        timeout_s: float,
    ) -> tuple[ExecEnd, DispatchResult | None, str | None]:
        """The dispatch, in the caller's own task (no task per call); the container's
        exit and a stop request interrupt it. The call counts as dispatched
        (``stop.dispatched``) once the function's socket has taken its connection: a
        call whose container turns out dead before that has not reached a function,
        and waits for another container as any waiting call does. A connection the
        function never accepted within the call's timeout did not reach it either:
        the container is stuck, and the call fails unstarted (NotAccepted, agent._submit)."""
        try:
            result = await interruptible(
                container.dispatch(request, sink, usage, on_delivered=stop.dispatched),
                timeout_s + DISPATCH_BACKSTOP_S,
                self._exited,
                stop.stopped,
                loop=self._loop,
            )
        except Interrupted:
            return self._judge_interrupt(stop)
        except HostShort:  # no connection for want of descriptors: nothing was sent,
            raise  # the container is as it was (the call goes back: agent._submit)
        except NotAccepted as exc:
            self.retire(f"it did not accept a call within {timeout_s:g} s: {exc}")
            raise NotAccepted(
                f"container {self.id} of {self.fn.ref} did not accept the call within "
                f"{timeout_s:g} s ({exc}); the call did not reach the function"
            ) from exc
        except NotDelivered as exc:
            self.retire(f"the function's socket took no connection: {exc}")
            # Dead before the call, its exit maybe not in yet: a driver that watches
            # the process says so at once (exc.exited); else wait for an exit report.
            dead = exc.exited or self.exit_info is not None
            if dead or (exc.exited is None and await self._settle_exit()):
                raise SlotUnusable(str(exc)) from exc
            # Alive and refusing: the function's fault, counted as such (a new
            # container for it would most likely refuse too).
            return ExecEnd.FAILED, None, f"the function's socket took no connection: {exc}"
        except TimeoutError:
            self.retire("a call ran past its timeout")
            return ExecEnd.TIMED_OUT, None, f"the function ran longer than {timeout_s:g} s"
        except AgentError as exc:
            return await self._judge_error(exc)
        except asyncio.CancelledError:
            self.retire("the call was interrupted mid-dispatch")
            raise
        if result.status not in KEEP_STATUSES:
            self.retire(f"the function answered with invalid status {result.status}")
        return ExecEnd.ANSWERED, result, None

    def _judge_interrupt(self, stop: StopControl) -> tuple[ExecEnd, None, str]:
        if self.exit_info is not None:
            self.retire("exited during a call")
            return ExecEnd.EXITED, None, self.exit_info.describe(self.fn.memory_mb)
        self.retire(stop.reason)
        return stop.end, None, stop.reason

    async def _judge_error(self, exc: AgentError) -> tuple[ExecEnd, None, str]:
        if isinstance(exc, InvalidResponse | ResponseTooBig):
            self.retire(f"bad response: {exc}")
            return ExecEnd.FAILED, None, str(exc)
        if isinstance(exc, DispatchError):
            self.retire(f"the exchange with the function broke: {exc}")
            # A driver that watched the process after the break says whether it exited
            # (it has waited for that already); else wait here for an exit report.
            exited = exc.exited if isinstance(exc, ExchangeBroken) else None
            if exited is not False and await self._settle_exit():
                assert self.exit_info is not None
                return ExecEnd.EXITED, None, self.exit_info.describe(self.fn.memory_mb)
            return ExecEnd.FAILED, None, f"error receiving the function's response: {exc}"
        self.retire(str(exc))
        if self.exit_info is not None:
            return ExecEnd.EXITED, None, self.exit_info.describe(self.fn.memory_mb)
        return ExecEnd.FAILED, None, str(exc)

    async def _settle_exit(self) -> bool:
        try:
            async with asyncio.timeout(EXIT_SETTLE_S):
                await asyncio.shield(self._exited)
        except TimeoutError:
            return False
        return True
