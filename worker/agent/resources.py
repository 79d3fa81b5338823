"""The tokens that hold the memory and CPU this worker may hand to containers
(:mod:`worker.agent.totals` measures how much that is).

A :class:`ResourceToken` holds memory (MB) and CPU (milli-CPUs) for a whole
container life, which is longer than the task that launched it: whoever owns
the container closes the token when the container is gone. ``close()`` is
idempotent. For scoped use, ``async with tracker.reserve(mem, cpu)``.

A launch that finds no room takes a :class:`ResourceTicket`: its place in
one line of waiting requests. Room that comes free is granted at once, in
the line's order, to each ticket it covers: first the tickets of launches
for functions that have no container (``starving_since`` set), the longest
starving first, then the others in the order they came; a ticket that does
not fit yet lets a later, smaller one that fits go ahead. No newcomer takes
room a waiting ticket fits in. A container leaving for a ticket's sake
(evicted or displaced, see :mod:`evictor`) hands its room to that ticket
(:meth:`ResourceToken.close` with ``heir``): the room is held for it alone
until it covers its request, or given back to the line if it stops waiting.

Waiting is by wake-up, never by polling: a ticket is granted by the release
that makes room for it, and :meth:`ResourceTracker.wait_async_resource` sleeps
on a generation event that every release bumps. That gate may leave out what
idle containers hold (the caller says how much, and tells
:meth:`ResourceTracker.lent_changed` when it changes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from config.settings import Settings
from worker.agent.errors import ResourceTooBig
from worker.agent.totals import MIB, HostPaths, ResourceTotals, measure_totals

log = logging.getLogger("fnq.agent.resources")

ASYNC_HIGH_WATER = 0.8  # async intake stops at 80 % of memory or CPU


# ------------------------------------------------------------------- tracking


@dataclass(frozen=True, slots=True)
class Shortfall:
    """How much is missing for a request right now (MB, mCPU), and how many idle
    containers must go whatever they hold (for room on the host: file descriptors,
    inodes)."""

    memory_mb: int
    cpu_mcpus: int
    containers: int = 0


@dataclass(frozen=True, slots=True)
class ResourceStats:
    memory_total_bytes: int
    memory_used_bytes: int
    cpu_total_mcpus: int
    cpu_used_mcpus: int
    tokens: int


class ResourceToken:
    """Memory and CPU held until :meth:`close` (idempotent)."""

    __slots__ = ("_closed", "_tracker", "cpu_mcpus", "memory_mb")

    def __init__(self, tracker: ResourceTracker, memory_mb: int, cpu_mcpus: int) -> None:
        self._tracker = tracker
        self.memory_mb = memory_mb
        self.cpu_mcpus = cpu_mcpus
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, heir: ResourceTicket | None = None) -> None:
        """Give the room back: to ``heir`` if that ticket still waits, else to the line."""
        if not self._closed:
            self._closed = True
            self._tracker._release(self, heir)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "held"
        return f"<ResourceToken {self.memory_mb} MB {self.cpu_mcpus} mCPU {state}>"


class ResourceTicket:
    """A request's place in the tracker's line, until it is granted or withdrawn.

    ``granted`` is set once a token waits in it (:meth:`take`). Room handed to it
    by leaving containers is held for it (``held_mb``, ``held_mcpus``), counted as
    used meanwhile. ``starving_since``: the loop time since which the launch is for
    a function that has no container (its owner keeps it up to date); such
    tickets go first.
    """

    __slots__ = (
        "_on_grant",
        "_token",
        "_tracker",
        "_withdrawn",
        "cpu_mcpus",
        "granted",
        "held_mb",
        "held_mcpus",
        "memory_mb",
        "starving_since",
    )

    def __init__(
        self,
        tracker: ResourceTracker,
        memory_mb: int,
        cpu_mcpus: int,
        on_grant: Callable[[], None] | None,
    ) -> None:
        self._tracker = tracker
        self.memory_mb = memory_mb
        self.cpu_mcpus = cpu_mcpus
        self.starving_since: float | None = None
        self.held_mb = 0
        self.held_mcpus = 0
        self.granted = asyncio.Event()
        self._token: ResourceToken | None = None
        self._withdrawn = False
        self._on_grant = on_grant

    @property
    def waiting(self) -> bool:
        """In the line: neither granted nor withdrawn."""
        return self._token is None and not self._withdrawn

    def take(self) -> ResourceToken | None:
        """The granted token (the caller owns it from now on); None if there is none."""
        token, self._token = self._token, None
        if token is not None:
            self._withdrawn = True
            self._tracker._untaken.discard(self)
        return token

    def withdraw(self) -> None:
        """Leave the line (idempotent): held room goes back, a token not taken is closed."""
        if self._withdrawn:
            return
        self._withdrawn = True
        token, self._token = self._token, None
        if token is not None:
            self._tracker._untaken.discard(self)
            token.close()
        else:
            self._tracker._withdraw(self)

    def _grant(self, token: ResourceToken) -> None:
        self._token = token
        self.granted.set()
        if self._on_grant is not None:
            self._on_grant()

    def __repr__(self) -> str:
        state = "waiting" if self.waiting else "done"
        return f"<ResourceTicket {self.memory_mb} MB {self.cpu_mcpus} mCPU {state}>"


def _line_order(ticket: ResourceTicket) -> tuple[bool, float]:
    """Starving tickets first, the longest starving first; then the others. (The sort
    is stable: tickets that compare equal stay in the order they came.)"""
    starving = ticket.starving_since
    return (starving is None, 0.0 if starving is None else starving)


class ResourceTracker:
    """Hands out memory and CPU tokens within fixed totals."""

    def __init__(self, totals: ResourceTotals) -> None:
        self.totals = totals
        self._memory_used_bytes = 0
        self._cpu_used_mcpus = 0
        self._tokens = 0
        self._changed = asyncio.Event()
        self._gate_waiters = 0
        self._line: dict[ResourceTicket, None] = {}  # waiting tickets, oldest first
        self._untaken: set[ResourceTicket] = set()  # granted, the token not taken yet

    @classmethod
    def from_host(cls, settings: Settings, paths: HostPaths | None = None) -> ResourceTracker:
        return cls(measure_totals(settings, paths))

    # ----------------------------------------------------------- queries
    def is_possible(self, memory_mb: int, cpu_mcpus: int) -> bool:
        """Whether the request could ever fit, with nothing else running."""
        return memory_mb * MIB <= self.totals.memory_bytes and cpu_mcpus <= self.totals.cpu_mcpus

    def fits_now(self, memory_mb: int, cpu_mcpus: int) -> bool:
        return (
            self._memory_used_bytes + memory_mb * MIB <= self.totals.memory_bytes
            and self._cpu_used_mcpus + cpu_mcpus <= self.totals.cpu_mcpus
        )

    def shortfall(
        self, memory_mb: int, cpu_mcpus: int, ticket: ResourceTicket | None = None
    ) -> Shortfall:
        """What the free room (plus what is held for ``ticket``) lacks for the request."""
        held_mb, held_mcpus = (ticket.held_mb, ticket.held_mcpus) if ticket else (0, 0)
        free_memory = self.totals.memory_bytes - self._memory_used_bytes + held_mb * MIB
        free_cpu = self.totals.cpu_mcpus - self._cpu_used_mcpus + held_mcpus
        missing_bytes = max(0, memory_mb * MIB - free_memory)
        return Shortfall(memory_mb=-(-missing_bytes // MIB), cpu_mcpus=max(0, cpu_mcpus - free_cpu))

    @property
    def waiting(self) -> int:
        """Tickets in the line."""
        return len(self._line)

    def starving(self) -> bool:
        """Whether a ticket for a function that has no container waits."""
        return any(t.starving_since is not None for t in self._line)

    def first_starving(self) -> ResourceTicket | None:
        """The waiting ticket for a function that has no container that has waited
        longest, if one waits."""
        starving = (t for t in self._line if t.starving_since is not None)
        return min(starving, key=_line_order, default=None)

    def promised(self) -> tuple[int, int, int]:
        """Memory (MB), CPU (mCPU) and tokens set aside for tickets, in use though no
        container holds them yet: room held for waiting tickets, tokens granted to
        tickets and not taken yet."""
        memory_mb = sum(t.held_mb for t in self._line)
        cpu_mcpus = sum(t.held_mcpus for t in self._line)
        for ticket in self._untaken:
            memory_mb += ticket.memory_mb
            cpu_mcpus += ticket.cpu_mcpus
        return memory_mb, cpu_mcpus, len(self._untaken)

    def below_async_high_water(self, lent_mb: int = 0, lent_mcpus: int = 0) -> bool:
        """Whether use is under 80 % of both totals, not counting ``lent_mb`` and
        ``lent_mcpus`` (held by containers that can give them back at once)."""
        return (
            self._memory_used_bytes - lent_mb * MIB < self.totals.memory_bytes * ASYNC_HIGH_WATER
            and self._cpu_used_mcpus - lent_mcpus < self.totals.cpu_mcpus * ASYNC_HIGH_WATER
        )

    def statistics(self) -> ResourceStats:
        return ResourceStats(
            memory_total_bytes=self.totals.memory_bytes,
            memory_used_bytes=self._memory_used_bytes,
            cpu_total_mcpus=self.totals.cpu_mcpus,
            cpu_used_mcpus=self._cpu_used_mcpus,
            tokens=self._tokens,
        )

    def too_big(self, memory_mb: int, cpu_mcpus: int) -> str:
        """In words, what of a request that is not possible this worker never has:
        ``needs 128 MB of memory, more than this worker has in all (47 MB)``."""
        need, have = [], []
        if memory_mb * MIB > self.totals.memory_bytes:
            need.append(f"{memory_mb} MB of memory")
            have.append(f"{self.totals.memory_bytes // MIB} MB")
        if cpu_mcpus > self.totals.cpu_mcpus:
            need.append(f"{cpu_mcpus} mCPU")
            have.append(f"{self.totals.cpu_mcpus} mCPU")
        return f"needs {' and '.join(need)}, more than this worker has in all ({', '.join(have)})"

    # ---------------------------------------------------------- acquiring
    def _check_possible(self, memory_mb: int, cpu_mcpus: int) -> None:
        if not self.is_possible(memory_mb, cpu_mcpus):
            raise ResourceTooBig(f"the function {self.too_big(memory_mb, cpu_mcpus)}")

    def try_acquire(self, memory_mb: int, cpu_mcpus: int) -> ResourceToken | None:
        """A token now, or None if there is not enough free room.

        Raises ResourceTooBig if the request can never fit.
        """
        self._check_possible(memory_mb, cpu_mcpus)
        if not self.fits_now(memory_mb, cpu_mcpus):
            return None
        self._memory_used_bytes += memory_mb * MIB
        self._cpu_used_mcpus += cpu_mcpus
        self._tokens += 1
        return ResourceToken(self, memory_mb, cpu_mcpus)

    def request(
        self, memory_mb: int, cpu_mcpus: int, on_grant: Callable[[], None] | None = None
    ) -> ResourceTicket:
        """A place in the line for the request, granted at once if it fits now.

        ``on_grant`` is called when a token is granted to it later (not at once).
        Raises ResourceTooBig if the request can never fit.
        """
        self._check_possible(memory_mb, cpu_mcpus)
        ticket = ResourceTicket(self, memory_mb, cpu_mcpus, None)
        self._line[ticket] = None
        self._grant_line()
        ticket._on_grant = on_grant
        return ticket

    async def acquire(
        self, memory_mb: int, cpu_mcpus: int, timeout_s: float | None = None
    ) -> ResourceToken:
        """Wait in the line until the request is granted, then take it.

        Raises ResourceTooBig at once if it can never fit, TimeoutError after
        ``timeout_s``.
        """
        ticket = self.request(memory_mb, cpu_mcpus)
        try:
            async with asyncio.timeout(timeout_s):
                await ticket.granted.wait()
        except BaseException:
            ticket.withdraw()  # closes a token granted meanwhile
            raise
        token = ticket.take()
        assert token is not None  # granted, and nothing else takes it
        return token

    @asynccontextmanager
    async def reserve(
        self, memory_mb: int, cpu_mcpus: int, timeout_s: float | None = None
    ) -> AsyncIterator[ResourceToken]:
        """``async with tracker.reserve(mb, mcpu) as token:`` released on exit."""
        token = await self.acquire(memory_mb, cpu_mcpus, timeout_s)
        try:
            yield token
        finally:
            token.close()

    async def wait_async_resource(
        self, timeout_s: float, lent: Callable[[], tuple[int, int]] | None = None
    ) -> bool:
        """True once usage is under 80 % of both totals; False after ``timeout_s``.

        ``lent()``: the memory (MB) and CPU (mCPU) held by containers that give it
        back on demand, not counted; call :meth:`lent_changed` when it changes.
        """
        if self.below_async_high_water(*(lent() if lent else (0, 0))):
            return True
        self._gate_waiters += 1
        try:
            async with asyncio.timeout(timeout_s):
                while not self.below_async_high_water(*(lent() if lent else (0, 0))):
                    await self._changed.wait()
        except TimeoutError:
            return False
        finally:
            self._gate_waiters -= 1
        return True

    def lent_changed(self) -> None:
        """What ``wait_async_resource``'s ``lent`` reports has changed."""
        if self._gate_waiters:
            self._wake()

    def _release(self, token: ResourceToken, heir: ResourceTicket | None) -> None:
        self._tokens -= 1
        if heir is not None and heir in self._line:
            heir.held_mb += token.memory_mb  # still counted as used, for ``heir`` alone
            heir.held_mcpus += token.cpu_mcpus
        else:
            self._memory_used_bytes -= token.memory_mb * MIB
            self._cpu_used_mcpus -= token.cpu_mcpus
        self._grant_line()
        self._wake()

    def _withdraw(self, ticket: ResourceTicket) -> None:
        if ticket not in self._line:
            return
        del self._line[ticket]
        if ticket.held_mb or ticket.held_mcpus:
            self._memory_used_bytes -= ticket.held_mb * MIB
            self._cpu_used_mcpus -= ticket.held_mcpus
            ticket.held_mb = ticket.held_mcpus = 0
            self._grant_line()
            self._wake()

    def _grant_line(self) -> None:
        """Grant every waiting ticket that its held room and the free room cover, in the
        line's order. Room held beyond a request goes back, which may cover another."""
        granted = True
        while granted and self._line:
            granted = False
            for ticket in sorted(self._line, key=_line_order):
                if self._covers(ticket):
                    self._grant(ticket)
                    granted = True
                    break

    def _covers(self, ticket: ResourceTicket) -> bool:
        free_bytes = self.totals.memory_bytes - self._memory_used_bytes
        free_mcpus = self.totals.cpu_mcpus - self._cpu_used_mcpus
        return (
            ticket.memory_mb * MIB <= free_bytes + ticket.held_mb * MIB
            and ticket.cpu_mcpus <= free_mcpus + ticket.held_mcpus
        )

    def _grant(self, ticket: ResourceTicket) -> None:
        del self._line[ticket]
        self._memory_used_bytes += (ticket.memory_mb - ticket.held_mb) * MIB
        self._cpu_used_mcpus += ticket.cpu_mcpus - ticket.held_mcpus
        ticket.held_mb = ticket.held_mcpus = 0
        self._tokens += 1
        self._untaken.add(ticket)
        ticket._grant(ResourceToken(self, ticket.memory_mb, ticket.cpu_mcpus))

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
