"""Slot queues: where waiting calls meet idle hot containers of their function.

There is one :class:`SlotQueue` per function configuration, keyed by
:func:`slot_key`. An idle container *offers* a :class:`Slot` on its queue; a
waiting call *takes* one, the most recently offered first (LIFO, so the
warmest container serves and the coldest ages out), paused ones only when no
running one is idle (an unpause costs about 13 ms). A slot offered while
calls wait goes straight to the one that has waited longest: first come,
first served, and only that call is woken. Otherwise taking is a race with
exactly one winner: a call, or the container itself when it leaves (idle
timeout, eviction, shutdown, its process died).

The queue also counts calls by :class:`RequestState` and containers by
:class:`ContainerState`; :meth:`SlotQueue.new_container_needed` decides from
those counts whether the launcher should start another container.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections import Counter
from enum import StrEnum
from typing import TYPE_CHECKING

from config.domain import Function
from config.errors import AgentError

if TYPE_CHECKING:
    from worker.agent.hot import HotContainer


def slot_key(fn: Function) -> str:
    """A stable hash of everything that makes two containers interchangeable."""
    digest = hashlib.sha256()
    for text in (fn.app, fn.name, fn.image):
        digest.update(text.encode() + b"\0")
    digest.update(
        struct.pack(
            "<IIIqq", fn.timeout_s, fn.idle_timeout_s, fn.tmpfs_mb, fn.memory_mb, fn.cpus_mcpu
        )
    )
    digest.update(b"\0")
    for key in sorted(fn.config):
        digest.update(key.encode() + b"\0" + fn.config[key].encode() + b"\0")
    return digest.hexdigest()


class RequestState(StrEnum):
    WAIT = "wait"  # waiting for a slot
    EXEC = "exec"  # running in a container


class ContainerState(StrEnum):
    WAIT = "wait"  # waiting for memory/CPU
    START = "start"  # being created and started
    IDLE = "idle"
    PAUSED = "paused"
    BUSY = "busy"
    DONE = "done"


SERVING_STATES = (ContainerState.IDLE, ContainerState.PAUSED, ContainerState.BUSY)
LIVE_CONTAINER_STATES = (
    ContainerState.WAIT,
    ContainerState.START,
    ContainerState.IDLE,
    ContainerState.PAUSED,
    ContainerState.BUSY,
)


class Caller:
    """A call waiting for a slot; launch failures meant for it land here."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.error: AgentError | None = None
        self.done = False
        self.asked = False  # has nudged the launcher: counts towards a launch
        self.wake = asyncio.Event()
        self.slot: Slot | None = None  # handed to it by an offer (SlotQueue.offer)

    def fail(self, error: AgentError) -> bool:
        """Hand a launch error to this caller; False if it no longer waits."""
        if self.done or self.error is not None:
            return False
        self.error = error
        self.wake.set()
        return True


class Slot:
    """One idle period of one container; taken exactly once."""

    __slots__ = ("_queue", "hot", "taken")

    def __init__(self, queue: SlotQueue, hot: HotContainer) -> None:
        self._queue = queue
        self.hot = hot
        self.taken = False

    def try_take(self) -> bool:
        """Win the slot; True for exactly one party.

        The container is not woken when a call wins: it learns of the call from
        its own timers, and the call hands the container back when it is over
        (:meth:`HotContainer.serve`).
        """
        if self.taken:
            return False
        self.taken = True
        self._queue._forget(self)
        return True


LAUNCH_PATIENCE_S = 0.02
BUSY_WINDOW_S = 0.25  # the busy share of a queue's containers is taken over this long
BUSY_SHARE_MIN_S = 0.05  # the current window counts once this old


class SlotQueue:
    """Idle slots, waiting calls and container counts of one function configuration."""

    def __init__(self, key: str, fn: Function) -> None:
        self.key = key
        self.fn = fn
        self._stack: list[Slot] = []
        self.requests: Counter[RequestState] = Counter()
        self.containers: Counter[ContainerState] = Counter()
        self.waiters: dict[Caller, None] = {}  # ordered set, oldest first
        self.containers_started = 0
        self.shared_failures = 0  # failed starts whose error ended every waiting call
        self._nudged = asyncio.Event()
        self._nudger: Caller | None = None
        self.last_used_s = 0.0
        self.asking = 0  # waiting callers that have nudged the launcher
        self.call_s = 0.0  # how long a call holds a container, smoothed; 0 = not known yet
        self.freed_at = -LAUNCH_PATIENCE_S  # loop time a call last gave its container back
        self.quick_s = 0.0  # the quickest recent hold: falls at once, rises 1 % a call
        self.holds = 0  # calls that have held a container (call_s and quick_s known if > 0)
        self._busy_s = 0.0  # container time held by calls ended in the current window
        self._window_at = 0.0  # loop time the current window began
        self._last_share = 1.0  # busy share of the last whole window (none yet: 1)
        self.closed = False  # no call waits here any more: slots are no longer handed over

    def held(self, seconds: float, now: float) -> None:
        """A call held a container for ``seconds`` until ``now`` (loop time)."""
        first = self.holds == 0
        self.holds += 1
        self.call_s = seconds if first else 0.8 * self.call_s + 0.2 * seconds
        quick = self.quick_s
        self.quick_s = seconds if first or seconds < quick else quick + 0.01 * (seconds - quick)
        self.freed_at = now
        if first:
            self._window_at = now - seconds
        self._busy_s += seconds
        if now - self._window_at >= BUSY_WINDOW_S:
            self._last_share = self._share(now)
            self._busy_s, self._window_at = 0.0, now

    def _share(self, now: float) -> float:
        serving = sum(self.containers[s] for s in SERVING_STATES)
        return self._busy_s / (max(1, serving) * (now - self._window_at))

    def busy_share(self, now: float) -> float:
        """How much of their time the queue's containers spent in calls lately: over
        the last whole window, or the current one if that is higher."""
        if now - self._window_at < BUSY_SHARE_MIN_S:
            return self._last_share
        return max(self._last_share, self._share(now))

    def launch_patience_s(self) -> float:
        """How long a call that finds no idle container waits before it asks for a
        launch: while one is busy, about one call's time (it may be free again long
        before a new container could start), at most LAUNCH_PATIENCE_S; else none."""
        if self.containers[ContainerState.BUSY] == 0:
            return 0.0
        return min(self.call_s, LAUNCH_PATIENCE_S)

    # ------------------------------------------------------------- slots
    def offer(self, hot: HotContainer) -> Slot:
        """A new idle slot of ``hot``: handed to the call that has waited longest, if
        one waits (it leaves the queue with it), else kept for the next taker.

        Handing it over, rather than waking every waiting call to race for it,
        wakes one task, and a call that comes later cannot take it first: in a
        steady stream the calls that wait would otherwise lose to the newcomers.
        (A slot is offered when its container is new or has just served a call,
        so it is never paused here.)
        """
        slot = Slot(self, hot)
        for caller in () if self.closed else self.waiters:
            if caller.error is None:
                slot.taken = True
                caller.slot = slot
                self.leave(caller)
                caller.wake.set()
                return slot
        self._stack.append(slot)
        return slot

    def take_idle(self, *, thawed_only: bool = False) -> Slot | None:
        """The most recently offered slot whose container is not paused, taken, else
        the most recent paused one (unless ``thawed_only``); None if none is idle."""
        stack = self._stack
        while stack:
            slot: Slot | None = stack[-1]
            if slot is not None and slot.hot.frozen:
                thawed = next((s for s in reversed(stack) if not s.hot.frozen), None)
                slot = thawed if thawed is not None or thawed_only else slot
            if slot is None:
                return None
            if slot.try_take():
                return slot
        return None

    def _forget(self, slot: Slot) -> None:
        stack = self._stack
        if stack and stack[-1] is slot:
            stack.pop()
        elif slot in stack:
            stack.remove(slot)

    @property
    def idle_slots(self) -> int:
        return len(self._stack)

    def calls_without_container(self) -> int:
        """Waiting calls beyond the idle slots (none when every one can have one)."""
        return max(0, len(self.waiters) - len(self._stack))

    def serving_containers(self) -> int:
        """Containers of the queue that have started: idle, paused or busy."""
        return sum(self.containers[state] for state in SERVING_STATES)

    def fail(self, caller: Caller, error: AgentError) -> bool:
        """Hand a launch error to ``caller``; False if it no longer waits or has one.
        A caller with an error asks for no container any more: it only has to wake up
        and leave, and a launch for it would start a container no call waits for."""
        if not caller.fail(error):
            return False
        if caller.asked and caller in self.waiters:
            caller.asked = False
            self.asking -= 1
        return True

    def fail_waiting(self, error: AgentError) -> int:
        """Hand ``error`` to every waiting call that has none yet; how many got it."""
        return sum(self.fail(caller, error) for caller in list(self.waiters))

    # ------------------------------------------------------------ counts
    def move(self, old: ContainerState | None, new: ContainerState) -> None:
        if old is not None:
            self.containers[old] -= 1
        if new is not ContainerState.DONE:
            self.containers[new] += 1

    def new_container_needed(self) -> bool:
        """Launch only if waiting calls that have asked for a container outnumber idle
        plus starting containers. (Fn counts every waiting call; a call that is still
        within its launch patience is not asking yet.)

        A function whose calls are short and whose containers are busy grows one
        container at a time: its busy containers free up sooner than a new one
        starts, so calls wait mostly for CPU, which more containers do not add,
        while each start takes CPU from the calls and memory from other functions.
        """
        idle = self.containers[ContainerState.IDLE] + self.containers[ContainerState.PAUSED]
        starting = self.containers[ContainerState.START] + self.containers[ContainerState.WAIT]
        waiting = self.asking
        uncovered = waiting - idle if waiting > idle else 0
        if uncovered == 0:
            return False
        short = 0.0 < self.call_s < LAUNCH_PATIENCE_S
        if short and starting > 0 and self.containers[ContainerState.BUSY] > 0:
            return False
        return not (starting > 0 and starting >= uncovered)

    def short_calls_cycling(self, now: float) -> bool:
        """Calls are short and busy containers keep coming free (one did within
        LAUNCH_PATIENCE_S of ``now``): another container would only add CPU to run
        them on. (When every container is stuck in a call, this is False.)

        Short by the quickest recent hold, not the average: on a loaded host a call
        holds its container while the worker gets round to the answer, so the
        average grows with the very load this is about."""
        return (
            0.0 < self.quick_s < LAUNCH_PATIENCE_S
            and self.containers[ContainerState.BUSY] > 0
            and now - self.freed_at < LAUNCH_PATIENCE_S
        )

    def live_containers(self) -> int:
        return sum(self.containers[state] for state in LIVE_CONTAINER_STATES)

    def is_idle(self) -> bool:
        """No call waits or runs and no container lives."""
        return not any(self.requests.values()) and not any(
            self.containers[state] for state in LIVE_CONTAINER_STATES
        )

    # ----------------------------------------------------------- callers
    def join(self, caller: Caller) -> None:
        self.waiters[caller] = None
        self.requests[RequestState.WAIT] += 1

    def leave(self, caller: Caller) -> None:
        caller.done = True
        if self.waiters.pop(caller, False) is None:
            self.requests[RequestState.WAIT] -= 1
            if caller.asked:
                self.asking -= 1

    def nudge(self, caller: Caller) -> None:
        """Ask the launcher to check whether a container is needed."""
        if not caller.asked and caller.error is None and caller in self.waiters:
            caller.asked = True
            self.asking += 1
        self._nudger = caller
        self._nudged.set()

    def poke(self) -> None:
        """Wake the launcher without a caller (its launch was granted room)."""
        self._nudged.set()

    async def next_nudge(self) -> Caller | None:
        """Wait for a nudge; the caller to tell if a launch fails (may be None)."""
        await self._nudged.wait()
        self._nudged.clear()
        caller, self._nudger = self._nudger, None
        return self.launch_owner(caller)

    def launch_owner(self, preferred: Caller | None) -> Caller | None:
        """``preferred`` if it still waits, else the oldest waiting caller, to tell of a
        failed launch; callers already holding an error are skipped."""
        if preferred is not None and preferred in self.waiters and preferred.error is None:
            return preferred
        return next((c for c in self.waiters if c.error is None), None)

    def close(self) -> None:
        """No call waits here any more (the agent stops waiting calls, or closes): wake
        every waiting call (each goes back as busy), and hand no slot to a waiting call
        from now on."""
        self.closed = True
        for caller in self.waiters:
            caller.wake.set()
