"""A CPU of the worker's own while that costs the host less, its containers on the others.

When calls are short and come fast, the worker's process and the functions'
containers take turns on the same CPUs: a wake-up may land on a CPU whose
caches hold another party's work, and the kernel moves the worker's thread
from CPU to CPU. Given a CPU of its own, with its containers on the others,
each side keeps its caches. On a 2-CPU host, one function (the echo
function, SQLite datastore), the worker's CPU per call fell from 256-270 to
187-210 us, the containers' from 206-208 to 148-167 us, and calls/s rose by
a third.

It does not always pay. The containers lose that CPU, and what else runs on
the host (a local redis-server, the producers) crowds the worker's. With ten
functions round-robin (about 30 containers) the containers filled their CPU,
the host spent more per call split than shared, and calls waiting on the
crowded CPU made the worker start more containers. So with
``FN_CPU_SPLIT=auto`` (the default) a worker with more than
:data:`CONTAINERS_PER_CPU` containers per CPU shares, and one with fewer
measures: while it is busy (at least
:data:`BUSY_CORES` of a CPU), it tries the other arrangement for
:data:`PROBE_S` of busy time after as long on the current one, compares the host's CPU time
per call it ended on each (all CPUs, from /proc/stat), and keeps the split only
if it costs at most :data:`KEEP_SHARE` of sharing. The verdict stands
:data:`HOLD_S`, then a busy worker probes again. A split also ends early when
the worker has gone quiet (under :data:`QUIET_CORES`) while the containers'
CPUs are full (:data:`CROWDED_SHARE`): functions that compute for long. A
quiet worker on a quiet host changes nothing. ``on`` splits from the start and
stays split; ``off`` never splits. A host with one CPU, or with no CPU left
unclaimed by other workers for the containers, never splits.

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
from dataclasses import dataclass
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
BUSY_CORES = 0.5  # the worker's own use (cores) above which a probe is worth it
PROBE_S = 2.0  # each arrangement is measured over this much busy time
PROBE_LIMIT_S = 60.0  # a probe that has not seen that much by then ends without a verdict
SETTLE_S = 0.5  # after a change, before its measuring starts
PROBE_CALLS = 200  # fewer calls in a measure tell nothing
KEEP_SHARE = 0.95  # the split stays if the host's CPU per call is at most this of sharing's
HOLD_S = 30.0  # a verdict stands this long
QUIET_CORES = 0.2  # a split ends early when the worker uses less than this
CROWDED_SHARE = 0.9  # ... while the containers' CPUs are at least this busy
CONTAINERS_PER_CPU = 2  # a worker with more containers than this per CPU does not split
PLACE_TIMEOUT_S = 30.0  # moving every live container
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Measure:
    """The host's busy CPU time and the calls ended over one arrangement's busy
    windows (``seconds`` of them)."""

    split: bool
    seconds: float = 0.0
    busy_s: float = 0.0
    calls: int = 0

    def per_call(self) -> float | None:
        return self.busy_s / self.calls if self.calls >= PROBE_CALLS else None


class CpuSplit:
    """Decides and applies the split for one worker process (see the module doc)."""

    def __init__(
        self,
        mode: SplitMode,
        place: Callable[[frozenset[int] | None], Awaitable[None]],
        *,
        calls_ended: Callable[[], int] = lambda: 0,
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
        self._calls_ended = calls_ended
        self._containers = containers
        self._claims = claims or CpuClaims(claim_dir())
        self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        self._own_cpu = own_cpu
        self._clock = clock
        self._set_affinity = set_affinity
        self._ticks = ticks
        self.split = False
        self.containers_on: frozenset[int] | None = None  # while split
        self.verdict_at = float("-inf")  # when the last probe (or early end) decided
        self._probe: list[Measure] = []  # the current probe's measures, first one first
        self._probe_began = 0.0
        self._settle_until = 0.0
        self._last = (clock(), own_cpu(), ticks(), calls_ended())

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
        """One window: read the counters, then probe, or end a crowded split."""
        now, elapsed, cores, busy_s, calls, crowded = self._read()
        many = self._containers() > CONTAINERS_PER_CPU * len(self.cpus)
        if many and (self.split or self._probe):
            self._probe = []
            self.verdict_at = now
            await self.end_split(f"{self._containers()} containers")
        elif self._probe:
            await self._probing(now, Measure(self.split, elapsed, busy_s, calls), cores)
        elif self.split and cores < QUIET_CORES and crowded >= CROWDED_SHARE:
            self.verdict_at = now
            await self.end_split(f"their CPUs were {crowded:.0%} busy, the worker used "
                                 f"{cores:.2f} of one")  # fmt: skip
        elif cores >= BUSY_CORES and not many and now - self.verdict_at >= HOLD_S:
            self._probe, self._probe_began = [Measure(self.split)], now
            await self._probing(now, Measure(self.split, elapsed, busy_s, calls), cores)

    async def _probing(self, now: float, window: Measure, cores: float) -> None:
        """Count a busy window into the arrangement being measured; switch, or judge,
        once it has been measured long enough. Quiet windows (between bursts) and
        those right after a change are left out."""
        first, current = self._probe[0], self._probe[-1]
        if now - self._probe_began > PROBE_LIMIT_S:
            await self._conclude(now, keep_split=first.split, why="too little load to compare")
            return
        if now < self._settle_until or cores < BUSY_CORES:
            return
        current.seconds += window.seconds
        current.busy_s += window.busy_s
        current.calls += window.calls
        if current.seconds < PROBE_S:
            return
        if len(self._probe) == 1:  # measured as it was: now the other way
            switched = await (self.end_split() if self.split else self.start_split())
            if not switched:
                await self._conclude(now, keep_split=self.split, why="no CPU to split")
                return
            self._settle_until = now + SETTLE_S
            self._probe.append(Measure(self.split))
            return
        shared, split = sorted(self._probe, key=lambda m: m.split)
        a, b = shared.per_call(), split.per_call()
        if a is None or b is None:
            await self._conclude(now, keep_split=self._probe[0].split, why="too few calls")
            return
        why = f"host CPU per call {1e6 * b:.0f} us split, {1e6 * a:.0f} us shared"
        await self._conclude(now, keep_split=b <= KEEP_SHARE * a, why=why)

    async def _conclude(self, now: float, *, keep_split: bool, why: str) -> None:
        self._probe = []
        self.verdict_at = now
        if keep_split and not self.split:
            await self.start_split(why)
        elif not keep_split and self.split:
            await self.end_split(why)
        else:
            log.info("the worker %s (%s)", "keeps a CPU of its own" if self.split else
                     "shares the CPUs with its containers", why)  # fmt: skip

    def _read(self) -> tuple[float, float, float, float, int, float]:
        """Now, and since the last read: the seconds, the worker's cores, the host's
        busy CPU seconds, the calls ended, and how busy the containers' CPUs were (0
        unless split)."""
        now, own, ticks, calls = self._clock(), self._own_cpu(), self._ticks(), self._calls_ended()
        then, own_then, ticks_then, calls_then = self._last
        self._last = (now, own, ticks, calls)
        elapsed = now - then
        cores = (own - own_then) / elapsed if elapsed > 0 else 0.0
        busy = sum(t[0] - ticks_then[c][0] for c, t in ticks.items() if c in ticks_then)
        crowd_busy = crowd_all = 0
        for cpu in self.containers_on or ():
            if cpu in ticks and cpu in ticks_then:
                crowd_busy += ticks[cpu][0] - ticks_then[cpu][0]
                crowd_all += ticks[cpu][1] - ticks_then[cpu][1]
        crowded = crowd_busy / crowd_all if crowd_all > 0 else 0.0
        return now, elapsed, cores, busy / CLK_TCK, calls - calls_then, crowded

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

    async def end_split(self, why: str = "") -> bool:
        if not self.split:
            return True
        self._set_affinity(self.cpus)
        self._claims.release()
        self.split, self.containers_on = False, None
        log.info("the worker and its containers share every CPU%s", f" ({why})" if why else "")
        await self._move_containers(None)
        return True

    async def _move_containers(self, cpus: frozenset[int] | None) -> None:
        try:
            async with asyncio.timeout(PLACE_TIMEOUT_S):
                await self._place(cpus)
        except TimeoutError:
            log.warning("moving the containers to other CPUs took over %.0f s", PLACE_TIMEOUT_S)
