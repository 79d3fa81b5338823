"""Making room for a launch: evicting idle containers of other functions, and
displacing busy ones for a function that has none.

Every hot container registers an :class:`EvictToken` when it is launched, and
counts as *starting* (:attr:`Evictor.starting`) until it first idles, or ends
without having come up: launches count the room such containers are about to
take on the host (:mod:`launcher`). The token is *evictable* only while its
container is idle. When a launch cannot
get its resources, or the host has no room for another container (the
worker's file descriptors, inodes for socket directories: the driver says how
many containers must go), :meth:`Evictor.evict_for` picks evictable tokens of
other functions, oldest first, that hold some of what is still missing (a
container without a CPU share frees no CPU; every container frees room on the
host), until they cover the shortfall, and evicts them all, or none at all if
they cannot cover it. An evicted container still races for its own slot: if a
call took it first, the container serves the call and its token counts as the
youngest again. The evictor also keeps the sum of what idle containers
hold, room the intake's gate need not count (agent.wait_async_resource).

When the room is held by busy containers, :meth:`Evictor.displace_for` lets a
launch that has waited long enough (the launcher decides when) take idle
containers of other functions and ask busy ones to leave once their current
call is over: of the busy ones, first those leaving anyway (retired), then
those of the function with the most containers, the longest-held first,
each one having served at least ``DISPLACE_MIN_CALLS`` calls (the current one
included), until they cover the shortfall; all or none. The current call
always ends as it would have. A displaced container checks again when its
call is over (:meth:`Evictor.leaves_after_call`): it leaves only if the
launch still waits.

A call short of descriptors for a new connection evicts the same way
(:meth:`Evictor.evict_for_connection`); the room of the containers it evicts
goes to the launch for a function without a container that has waited
longest, if one waits, else back to the common line.

The room of a container evicted or displaced for a launch goes to that
launch's ticket (:class:`resources.ResourceTicket`), never back to the common
line, where an older launch (of the displaced container's own function, say)
would take it first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from worker.agent.resources import ResourceTicket, Shortfall

log = logging.getLogger("fnq.agent.evictor")

_ids = itertools.count(1)
DISPLACE_MIN_CALLS = 2  # calls a container has served (the current one included) to be displaced


class EvictToken:
    def __init__(self, key: str, memory_mb: int, cpu_mcpus: int, on_evict: Callable[[], None]):
        self.id = next(_ids)
        self.key = key
        self.memory_mb = memory_mb
        self.cpu_mcpus = cpu_mcpus
        self.evictable = False
        self.requested = False  # eviction asked for; the container leaves if it wins its slot
        self.done = asyncio.Event()  # the container is gone and its resources are free
        self.busy = False  # in a call
        self.calls = 0  # calls it has taken
        self.leaving = False  # retired: it goes at its next chance whatever happens here
        self.displaced = False  # asked to leave after its call, for ``heir``
        self.heir: ResourceTicket | None = None  # the launch its room goes to when it leaves
        self.up = False  # offered once (started), or gone: no longer counted as starting
        self._on_evict = on_evict

    def _evict(self) -> None:
        self.requested = True
        self._on_evict()


class Evictor:
    def __init__(
        self,
        on_idle_change: Callable[[], None] | None = None,
        first_starving: Callable[[], ResourceTicket | None] | None = None,
    ) -> None:
        self._tokens: dict[int, EvictToken] = {}  # insertion order = age
        self.evictions = 0
        self.displacements = 0  # busy containers that left after their call for a launch
        self.idle_memory_mb = 0  # held by evictable (idle) containers
        self.idle_cpu_mcpus = 0
        # registered, not up yet: waiting for a turn to start, or starting (see starting)
        self.starting = 0
        self._on_idle_change = on_idle_change
        # the launch for a function without a container that has waited longest, if any
        self._first_starving = first_starving or (lambda: None)

    def idle(self) -> tuple[int, int]:
        """Memory (MB) and CPU (mCPU) held by idle containers, which give it back on
        demand: a call takes one, or a launch evicts one."""
        return self.idle_memory_mb, self.idle_cpu_mcpus

    def _set_evictable(self, token: EvictToken, evictable: bool) -> None:
        if token.evictable == evictable:
            return
        token.evictable = evictable
        sign = 1 if evictable else -1
        self.idle_memory_mb += sign * token.memory_mb
        self.idle_cpu_mcpus += sign * token.cpu_mcpus
        if self._on_idle_change is not None:
            self._on_idle_change()

    def register(
        self, key: str, memory_mb: int, cpu_mcpus: int, on_evict: Callable[[], None]
    ) -> EvictToken:
        token = EvictToken(key, memory_mb, cpu_mcpus, on_evict)
        self._tokens[token.id] = token
        self.starting += 1
        return token

    def _up(self, token: EvictToken) -> None:
        """The container is up, or gone without having come up: not starting any more."""
        if not token.up:
            token.up = True
            self.starting -= 1

    def enable(self, token: EvictToken) -> None:
        """The container is idle: it may be evicted."""
        token.busy = False
        self._up(token)
        if token.id in self._tokens:
            self._set_evictable(token, True)

    def disable(self, token: EvictToken) -> None:
        """The container is busy. If an eviction lost the race, it queues up again.

        The launcher that asked for that eviction stops waiting for it (nothing
        was freed) and tries again.
        """
        token.busy = True
        token.calls += 1
        self._set_evictable(token, False)
        if token.requested and token.id in self._tokens:
            token.requested = False
            token.heir = None
            del self._tokens[token.id]
            self._tokens[token.id] = token
            lost, token.done = token.done, asyncio.Event()
            lost.set()

    def unregister(self, token: EvictToken) -> None:
        self._up(token)
        self._tokens.pop(token.id, None)
        self._set_evictable(token, False)
        token.done.set()

    def evict_for(
        self, key: str, need: Shortfall, heir: ResourceTicket | None = None
    ) -> list[asyncio.Event]:
        """Evict enough idle containers of other functions to cover ``need``, or none;
        their room goes to ``heir`` (if given, while it waits).

        Returns the events that are set once each evicted container is gone.
        """
        chosen = _covering((t for t in self._tokens.values() if t.key != key and t.evictable), need)
        for token in chosen:
            self._set_evictable(token, False)
            token.heir = heir
            token._evict()
        self.evictions += len(chosen)
        return [token.done for token in chosen]

    def evict_for_connection(self, key: str, containers: int) -> list[asyncio.Event]:
        """Evict ``containers`` idle containers of other functions, or none, for the
        descriptors a new connection to a container of ``key`` needs. Their memory and
        CPU go to the launch for a function without a container that has waited
        longest, if one waits: its idle room is left to it, as launches of functions
        that have a container leave it (launcher). The events of the evicted ones."""
        return self.evict_for(key, Shortfall(0, 0, containers), self._first_starving())

    def displace_for(
        self, key: str, need: Shortfall, heir: ResourceTicket
    ) -> tuple[list[asyncio.Event], int]:
        """Make room for ``heir`` from containers of other functions, enough to cover
        ``need`` beyond what is already displaced for it, or none: idle ones first
        (evicted), then busy ones, asked to leave after their current call. Their room
        goes to ``heir``. The events of the evicted ones (set once each is gone), and
        how many busy ones were asked."""
        pending_mb = pending_mcpus = 0
        for token in self._tokens.values():
            if token.displaced and token.heir is heir:
                pending_mb += token.memory_mb
                pending_mcpus += token.cpu_mcpus
        need = Shortfall(need.memory_mb - pending_mb, need.cpu_mcpus - pending_mcpus)
        containers: Counter[str] = Counter(t.key for t in self._tokens.values())
        busy = sorted(
            (t for t in self._tokens.values() if t.key != key and _displaceable(t)),
            key=lambda t: (not t.leaving, -containers[t.key]),  # stable: oldest first
        )
        idle = (t for t in self._tokens.values() if t.key != key and t.evictable)
        chosen = _covering(itertools.chain(idle, busy), need)
        evicted = [t for t in chosen if t.evictable]
        for token in evicted:
            self._set_evictable(token, False)
            token.heir = heir
            token._evict()
        self.evictions += len(evicted)
        asked = 0
        for token in chosen:
            if not token.requested:
                token.displaced = True
                token.heir = heir
                asked += 1
        return [t.done for t in evicted], asked

    def leaves_after_call(self, token: EvictToken) -> bool:
        """Whether the container, its call over, leaves for the launch it was displaced
        for; if that launch no longer waits, the container stays (and is no longer
        displaced)."""
        if not token.displaced:
            return False
        heir = token.heir
        if heir is not None and heir.waiting:
            self.displacements += 1
            return True
        token.displaced = False
        token.heir = None
        return False

    def __len__(self) -> int:
        return len(self._tokens)


def _displaceable(token: EvictToken) -> bool:
    """Busy, not asked to go already (by an eviction, or for a launch still waiting),
    and leaving anyway or past its minimum of calls."""
    if not token.busy or token.requested:
        return False
    if token.displaced and token.heir is not None and token.heir.waiting:
        return False
    return token.leaving or token.calls >= DISPLACE_MIN_CALLS


def _covering(tokens: Iterable[EvictToken], need: Shortfall) -> list[EvictToken]:
    """Tokens taken in order, each holding some of what is still missing (a container
    without a CPU share frees no CPU; any container frees room on the host while
    ``need.containers`` are missing), until they cover ``need``; none if they cannot."""
    if need.memory_mb <= 0 and need.cpu_mcpus <= 0 and need.containers <= 0:
        return []
    chosen: list[EvictToken] = []
    memory_mb = cpu_mcpus = 0
    for token in tokens:
        if not (
            len(chosen) < need.containers
            or (memory_mb < need.memory_mb and token.memory_mb > 0)
            or (cpu_mcpus < need.cpu_mcpus and token.cpu_mcpus > 0)
        ):
            continue  # it holds none of what is still missing: it stays
        chosen.append(token)
        memory_mb += token.memory_mb
        cpu_mcpus += token.cpu_mcpus
        if (
            memory_mb >= need.memory_mb
            and cpu_mcpus >= need.cpu_mcpus
            and len(chosen) >= need.containers
        ):
            return chosen
    return []


async def wait_gone(
    gone: Sequence[asyncio.Event], timeout_s: float, stopped: asyncio.Future[Any] | None = None
) -> bool:
    """Wait until every evicted container is gone (each of ``gone`` set), for at most
    ``timeout_s``, or until ``stopped`` is done; whether all of them went."""
    waits = {asyncio.ensure_future(event.wait()) for event in gone}
    pending = set(waits)
    try:
        async with asyncio.timeout(timeout_s):
            while pending and not (stopped is not None and stopped.done()):
                watched = pending if stopped is None else pending | {stopped}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
    except TimeoutError:
        log.warning("evicted containers of other functions are slow to go")
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return not pending
