"""A CPU of the worker's own while it is busy, its containers on the others.

When calls are short and come fast, the worker's process and the functions'
containers take turns on the same CPUs: a wake-up may land on a CPU whose
caches hold another party's work, and the kernel moves the worker's thread
from CPU to CPU. Given a CPU of its own, with its containers on the others,
each side keeps its caches. On a 2-CPU host, one function (the echo
function, SQLite datastore, bursts), the worker's CPU per call fell from
239-255 to 205-217 us, the containers' from 183-210 to 161-176 us, and calls/s
rose from 3,139-3,522 to 3,963-4,196.

It does not always pay. The containers lose that CPU, and what else runs on
the host (a local redis-server, the producers) crowds the worker's. With ten
functions round-robin (about 30 containers) the containers filled their CPU,
the host spent more CPU per call split than shared, and calls waiting on the
crowded CPU made the worker start more containers. So with
``FN_CPU_SPLIT=auto`` (the default) the worker takes a CPU of its own when it
uses at least :data:`BUSY_CORES` of one over a window and has at most
:data:`CONTAINERS_PER_CPU` containers per CPU, and gives it back when it has
more, or when it has been quiet (under :data:`QUIET_CORES`) while the
containers' CPUs were full (:data:`CROWDED_SHARE`) for :data:`CROWDED_FOR_S`:
functions that compute for long. A quiet worker on a quiet host changes
nothing. At most one change per :data:`HOLD_S`. ``on`` splits from the start
and stays split; ``off`` never splits. A host with one CPU, or with no CPU
left unclaimed by other workers for the containers, never splits.

Nothing here runs on a call's path: a task samples counters every
:data:`WINDOW_S`, and a change moves the worker's threads
(``sched_setaffinity``) and its containers (the driver's ``place``, one engine
request per live container).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from worker.agent.cpu_place import (
    CpuClaims,
    claim_dir,
    cpu_list,
    cpu_ticks,
    set_process_affinity,
)

log = logging.getLogger("fnq.agent.cpu")

SplitMode = Literal["auto", "on", "off"]
Ticks = dict[int, tuple[int, int]]
WINDOW_S = 0.5  # how often the counters are read
BUSY_CORES = 0.5  # the worker's own use (cores) from which it splits
CONTAINERS_PER_CPU = 3  # a worker with more containers than this per CPU shares
QUIET_CORES = 0.2  # a split ends when the worker uses less than this
CROWDED_SHARE = 0.9  # ... while the containers' CPUs are at least this busy
CROWDED_FOR_S = 5.0  # ... all along this long
HOLD_S = 10.0  # the least time between two changes
PLACE_TIMEOUT_S = 30.0  # moving every live container


class CpuSplit:
    """Decides and applies the split for one worker process (see the module doc)."""

    def __init__(
        self,
        mode: SplitMode,
        place: Callable[[frozenset[int] | None], Awaitable[None]],
        *,
        containers: Callable[[], int] = lambda: 0,
        claims: CpuClaims | None = None,
        cpus: set[int] | None = None,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        set_affinity: Callable[[set[int]], None] = set_process_affinity,
        ticks: Callable[[], Ticks] = cpu_ticks,
    ) -> None:
        self.mode = mode
        self._place = place
        self._containers = containers
        self._claims = claims or CpuClaims(claim_dir())
        self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        self._own_cpu = own_cpu
        self._clock = clock
        self._set_affinity = set_affinity
        self._ticks = ticks
        self.split = False
        self.containers_on: frozenset[int] | None = None  # while split
        self.changed_at = float("-inf")  # when the last change was made (or tried)
        self._crowded_since: float | None = None  # quiet worker, full container CPUs
        self._last = (clock(), own_cpu(), ticks())

    @property
    def worker_cpu(self) -> int | None:
        return self._claims.cpu if self.split else None

    async def run(self) -> None:
        """Sample and decide until cancelled. Then the process's threads may run on
        every CPU again and the claim is let go; the containers stay where they are
        (the agent removes them next)."""
        try:
            if self.mode == "on":
                await self.start_split()
                await asyncio.get_running_loop().create_future()  # until cancelled
            while self.mode == "auto":
                await asyncio.sleep(WINDOW_S)
                await self.tick()
        finally:
            if self.split:
                self._set_affinity(self.cpus)
                self.split, self.containers_on = False, None
            self._claims.release()

    # ------------------------------------------------------------- policy
    async def tick(self) -> None:
        """One window: read the counters, then split, end the split, or neither."""
        now, cores, crowded = self._read()
        if not (self.split and cores < QUIET_CORES and crowded >= CROWDED_SHARE):
            self._crowded_since = None
        elif self._crowded_since is None:
            self._crowded_since = now - WINDOW_S  # since the start of this window
        if now - self.changed_at < HOLD_S:
            return
        containers = self._containers()
        many = containers > CONTAINERS_PER_CPU * len(self.cpus)
        if self.split and many:
            self.changed_at = now
            await self.end_split(f"it has {containers} containers")
        elif (
            self.split
            and self._crowded_since is not None
            and (now - self._crowded_since >= CROWDED_FOR_S)
        ):
            self.changed_at = now
            await self.end_split(f"their CPUs were {crowded:.0%} busy, the worker used "
                                 f"{cores:.2f} of one")  # fmt: skip
        elif not self.split and not many and cores >= BUSY_CORES:
            self.changed_at = now
            await self.start_split(f"it used {cores:.2f} of a CPU")

    def _read(self) -> tuple[float, float, float]:
        """Now, and since the last read: the worker's cores, and how busy the
        containers' CPUs were (0 unless split)."""
        now, own, ticks = self._clock(), self._own_cpu(), self._ticks()
        then, own_then, ticks_then = self._last
        self._last = (now, own, ticks)
        elapsed = now - then
        cores = (own - own_then) / elapsed if elapsed > 0 else 0.0
        busy = total = 0
        for cpu in self.containers_on or ():
            if cpu in ticks and cpu in ticks_then:
                busy += ticks[cpu][0] - ticks_then[cpu][0]
                total += ticks[cpu][1] - ticks_then[cpu][1]
        return now, cores, busy / total if total > 0 else 0.0

    # ------------------------------------------------------------ changes
    async def start_split(self, why: str = "") -> bool:
        if self.split or len(self.cpus) < 2:
            return self.split
        mine = self._claims.claim(self.cpus)
        if mine is None:
            log.debug("no CPU of its own for the worker: every one is claimed")
            return False
        others = frozenset(self.cpus - {mine} - self._claims.held_elsewhere(self.cpus))
        if not others:
            log.debug("no CPU would be left for the containers: the worker does not split")
            self._claims.release()
            return False
        self._set_affinity({mine})
        self.split, self.containers_on = True, others
        log.info("the worker runs on CPU %d, its containers on %s%s", mine, cpu_list(others),
                 f" ({why})" if why else "")  # fmt: skip
        await self._move_containers(others)
        return True

    async def end_split(self, why: str = "") -> None:
        if not self.split:
            return
        self._set_affinity(self.cpus)
        self._claims.release()
        self.split, self.containers_on = False, None
        log.info("the worker and its containers share every CPU%s", f" ({why})" if why else "")
        await self._move_containers(None)

    async def _move_containers(self, cpus: frozenset[int] | None) -> None:
        try:
            async with asyncio.timeout(PLACE_TIMEOUT_S):
                await self._place(cpus)
        except TimeoutError:
            log.warning("moving the containers to other CPUs took over %.0f s", PLACE_TIMEOUT_S)
