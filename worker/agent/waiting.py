"""A call's wait for a slot of its queue (a part of :class:`agent.Agent`).

The call takes an idle slot at once if there is one (while a container of the
queue is busy, a thawed one only: see ``PREFER_THAWED_S``). Else it joins the
queue as a caller, nudges the queue's launcher (after the queue's launch
patience, or the call's own if longer, then every ``FN_HOT_POLL_MSECS``) and
sleeps until a slot is handed to it, a launch error is meant for it, it is
stopped, or the agent stops letting calls wait. Past its function's timeout it
gives up as busy, unless a container of the queue is starting then.
"""

from __future__ import annotations

import asyncio

from worker.agent.errors import AgentClosed, ServerBusy
from worker.agent.execution import StopControl
from worker.agent.slots import Caller, ContainerState, Slot, SlotQueue

PREFER_THAWED_S = 0.005  # see _get_slot


class SlotWaits:
    """How :class:`agent.Agent`'s calls wait for a slot; ``Agent.__init__`` sets the
    attributes declared here."""

    hot_poll_s: float
    _no_waiting: bool  # set by stop_waiting and close: no call waits any more

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
