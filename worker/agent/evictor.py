"""Evicting idle containers of other functions to make room for a launch.

Every hot container that holds memory or CPU registers an
:class:`EvictToken` when it starts. The token is *evictable* only while its
container is idle. When a launch cannot get its resources,
:meth:`Evictor.evict_for` picks evictable tokens of other functions, oldest
first, that hold some of what is still missing (a container without a CPU
share frees no CPU), until they cover the shortfall, and evicts them all, or
none at all if they cannot cover it. An evicted container still races for its own slot: if a
call took it first, the container serves the call and its token goes to the
back of the line again. The evictor also keeps the sum of what idle containers
hold, room the intake's gate need not count (agent.wait_async_resource).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from worker.agent.resources import Shortfall

_ids = itertools.count(1)


class EvictToken:
    def __init__(self, key: str, memory_mb: int, cpu_mcpus: int, on_evict: Callable[[], None]):
        self.id = next(_ids)
        self.key = key
        self.memory_mb = memory_mb
        self.cpu_mcpus = cpu_mcpus
        self.evictable = False
        self.requested = False  # eviction asked for; the container leaves if it wins its slot
        self.done = asyncio.Event()  # the container is gone and its resources are free
        self._on_evict = on_evict

    def _evict(self) -> None:
        self.requested = True
        self._on_evict()


class Evictor:
    def __init__(self, on_idle_change: Callable[[], None] | None = None) -> None:
        self._tokens: dict[int, EvictToken] = {}  # insertion order = age
        self.evictions = 0
        self.idle_memory_mb = 0  # held by evictable (idle) containers
        self.idle_cpu_mcpus = 0
        self._on_idle_change = on_idle_change

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
        if memory_mb or cpu_mcpus:
            self._tokens[token.id] = token
        return token

    def enable(self, token: EvictToken) -> None:
        """The container is idle: it may be evicted."""
        if token.id in self._tokens:
            self._set_evictable(token, True)

    def disable(self, token: EvictToken) -> None:
        """The container is busy. If an eviction lost the race, it queues up again.

        The launcher that asked for that eviction stops waiting for it (nothing
        was freed) and tries again.
        """
        self._set_evictable(token, False)
        if token.requested and token.id in self._tokens:
            token.requested = False
            del self._tokens[token.id]
            self._tokens[token.id] = token
            lost, token.done = token.done, asyncio.Event()
            lost.set()

    def unregister(self, token: EvictToken) -> None:
        self._tokens.pop(token.id, None)
        self._set_evictable(token, False)
        token.done.set()

    def evict_for(self, key: str, need: Shortfall) -> list[asyncio.Event]:
        """Evict enough idle containers of other functions to cover ``need``, or none.

        Returns the events that are set once each evicted container is gone.
        """
        if need.memory_mb <= 0 and need.cpu_mcpus <= 0:
            return []
        chosen: list[EvictToken] = []
        memory_mb = cpu_mcpus = 0
        for token in self._tokens.values():
            if token.key == key or not token.evictable:
                continue
            if not (
                (memory_mb < need.memory_mb and token.memory_mb > 0)
                or (cpu_mcpus < need.cpu_mcpus and token.cpu_mcpus > 0)
            ):
                continue  # it holds none of what is still missing: it stays
            chosen.append(token)
            memory_mb += token.memory_mb
            cpu_mcpus += token.cpu_mcpus
            if memory_mb >= need.memory_mb and cpu_mcpus >= need.cpu_mcpus:
                break
        else:
            return []
        for token in chosen:
            self._set_evictable(token, False)
            token._evict()
        self.evictions += len(chosen)
        return [token.done for token in chosen]

    def __len__(self) -> int:
        return len(self._tokens)
