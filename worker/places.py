"""The prefetch bound: places for calls that are reserved but not yet running."""

from __future__ import annotations

import asyncio
import contextlib


class Places:
    """A counter of free places that can be taken several at a time.

    ``take(most)`` waits until at least one place is free and takes up to
    ``most`` of the free ones, so that one queue round trip can fill them all.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("there must be at least one place")
        self.total = total
        self.free = total
        self._freed = asyncio.Event()

    async def take(self, most: int, gather_s: float = 0.0) -> int:
        """Take between 1 and ``most`` places; waits (no timeout) while none is free,
        then up to ``gather_s`` more while fewer than ``most`` are.

        The caller bounds the wait: it is cancelled on shutdown.
        """
        while self.free == 0:
            self._freed.clear()
            await self._freed.wait()
        if gather_s > 0 and self.free < most:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gather_s):
                    while self.free < most:
                        self._freed.clear()
                        await self._freed.wait()
        taken = min(most, self.free)
        self.free -= taken
        return taken

    def give(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.free = min(self.total, self.free + count)
        self._freed.set()
