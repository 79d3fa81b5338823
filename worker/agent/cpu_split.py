"""A CPU of the worker's own while it is busy, its containers on the others.

When calls are short and come fast, the worker's process and the functions'
containers take turns on the same CPUs: each wake-up may land on a CPU whose
caches hold another party's work, and the kernel moves the worker's thread
from one CPU to another. Given a CPU of its own, with the containers on the
others, each side keeps its caches. Measured on a 2-CPU host, end to end (the
echo function, SQLite datastore): the worker's CPU per call fell from
256-270 to 187-210 us, the containers' from 206-208 to 148-167 us, and
calls/s rose from 2,900-3,300 to 3,900-4,400.

The split costs the containers that CPU. It pays while the worker is a busy
party: :data:`SPLIT_AT_CORES` of its own use means thousands of calls a second,
short ones. A function that computes for long keeps the worker nearly idle,
so with ``FN_CPU_SPLIT=auto`` (the default) its containers keep every CPU:
the split comes when the worker has used at least ``SPLIT_AT_CORES`` over a
window, and goes when the containers lack the CPU it holds: their CPUs at
least :data:`CROWDED_SHARE` busy while the worker uses under
``JOIN_BELOW_CORES`` (an idle host loses nothing to the split). At most one
change per :data:`HOLD_S`. ``on`` splits from the start, ``off`` never.

Several workers on one host each claim a different CPU: a claim is an
exclusive ``flock`` on a file per CPU in a directory shared by the host's
workers (it ends with the process, however that ends), and containers go to
the CPUs that no worker claims. A worker that finds no CPU to claim, or none
left for containers, does not split.

Nothing here runs on a call's path: a task samples the process's CPU time
every :data:`WINDOW_S`, and a change moves the worker's threads
(``sched_setaffinity``) and the containers (the driver's ``place``, an engine
request per live container).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Literal

log = logging.getLogger("fnq.agent.cpu")

SplitMode = Literal["auto", "on", "off"]
SPLIT_AT_CORES = 0.5  # the worker's own CPU use that splits
JOIN_BELOW_CORES = 0.2  # ... under which the split may end,
CROWDED_SHARE = 0.9  # when the containers' CPUs are at least this busy
WINDOW_S = 0.5  # how often the use is sampled
HOLD_S = 10.0  # the least time between two changes
PLACE_TIMEOUT_S = 30.0  # moving every live container


def claim_dir() -> Path:
    """Where the host's workers keep their claims: /run/fnq-cpus, else under TMPDIR."""
    run = Path("/run")
    if os.access(run, os.W_OK):
        return run / "fnq-cpus"
    return Path(tempfile.gettempdir()) / "fnq-cpus"


class CpuClaims:
    """One lock file per CPU; this process holds at most one of them."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self.cpu: int | None = None
        self._fd: int | None = None

    def _open(self, cpu: int) -> int:
        self._dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        return os.open(self._dir / f"cpu{cpu}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def claim(self, candidates: Iterable[int]) -> int | None:
        """Claim the highest of ``candidates`` that no other process holds."""
        self.release()
        for cpu in sorted(candidates, reverse=True):
            try:
                fd = self._open(cpu)
            except OSError as exc:
                log.debug("no CPU claims in %s: %s", self._dir, exc)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.cpu, self._fd = cpu, fd
            return cpu
        return None

    def held_elsewhere(self, cpus: Iterable[int]) -> set[int]:
        """Those of ``cpus`` that another process has claimed."""
        held = set()
        for cpu in cpus:
            if cpu == self.cpu or not (self._dir / f"cpu{cpu}").exists():
                continue
            try:
                fd = self._open(cpu)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                held.add(cpu)
            finally:
                os.close(fd)  # closing drops a shared lock taken just now
        return held

    def release(self) -> None:
        fd, self._fd, self.cpu = self._fd, None, None
        if fd is not None:
            os.close(fd)


def online_cpus() -> str:
    """The host's online CPUs in list format ("0-3"), or "" if unknown."""
    try:
        return Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return ""


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """CPU number -> (busy, all) clock ticks since boot, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if not line.startswith(b"cpu") or line.startswith(b"cpu "):
                    if out:
                        break  # the per-CPU lines come right after the total
                    continue
                name, *fields = line.split()
                ticks = [int(f) for f in fields[:8]]
                idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
                out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    except (OSError, ValueError) as exc:
        log.debug("no per-CPU counters: %s", exc)
    return out


def _set_process_affinity(cpus: set[int]) -> None:
    """Every thread of this process, and those it starts later, on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


class CpuSplit:
    """Decides and applies the split for one worker process (see the module doc)."""

    def __init__(
        self,
        mode: SplitMode,
        place: Callable[[frozenset[int] | None], Awaitable[None]],
        *,
        claims: CpuClaims | None = None,
        cpus: set[int] | None = None,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        set_affinity: Callable[[set[int]], None] = _set_process_affinity,
        ticks: Callable[[], dict[int, tuple[int, int]]] = cpu_ticks,
    ) -> None:
        self.mode = mode
        self._place = place
        self._claims = claims or CpuClaims(claim_dir())
        self.cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        self._own_cpu = own_cpu
        self._clock = clock
        self._set_affinity = set_affinity
        self.split = False
        self.containers_on: frozenset[int] | None = None  # while split
        self._ticks = ticks
        self._changed_at = float("-inf")
        self._sample = (clock(), own_cpu())
        self._cpu_sample = ticks()

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

    def worker_cores(self) -> float:
        """The worker's CPU use (cores) since the last call of this method."""
        now, used = self._clock(), self._own_cpu()
        then, used_then = self._sample
        self._sample = (now, used)
        return (used - used_then) / (now - then) if now > then else 0.0

    def containers_busy(self) -> float:
        """How busy the containers' CPUs were since the last call of this method
        (0 while not split, or without counters)."""
        now = self._ticks()
        then, self._cpu_sample = self._cpu_sample, now
        busy = total = 0
        for cpu in self.containers_on or ():
            if cpu in now and cpu in then:
                busy += now[cpu][0] - then[cpu][0]
                total += now[cpu][1] - then[cpu][1]
        return busy / total if total > 0 else 0.0

    async def tick(self) -> None:
        cores, crowded = self.worker_cores(), self.containers_busy()
        if self._clock() - self._changed_at < HOLD_S:
            return
        if not self.split and cores >= SPLIT_AT_CORES:
            await self.start_split(cores)
        elif self.split and cores < JOIN_BELOW_CORES and crowded >= CROWDED_SHARE:
            await self.end_split(cores, crowded)

    async def start_split(self, cores: float | None = None) -> bool:
        self._changed_at = self._clock()
        if len(self.cpus) < 2:
            return False
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
        use = "" if cores is None else f" (it used {cores:.2f} of a CPU)"
        log.info("the worker runs on CPU %d, its containers on %s%s", mine, cpu_list(others), use)
        await self._move_containers(others)
        return True

    async def end_split(self, cores: float | None = None, crowded: float | None = None) -> None:
        self._changed_at = self._clock()
        if not self.split:
            return
        self._set_affinity(self.cpus)
        self._claims.release()
        self.split, self.containers_on = False, None
        why = ""
        if cores is not None and crowded is not None:
            why = f" (their CPUs were {crowded:.0%} busy, the worker used {cores:.2f} of one)"
        log.info("the worker and its containers share every CPU again%s", why)
        await self._move_containers(None)

    async def _move_containers(self, cpus: frozenset[int] | None) -> None:
        try:
            async with asyncio.timeout(PLACE_TIMEOUT_S):
                await self._place(cpus)
        except TimeoutError:
            log.warning("moving the containers to other CPUs took over %.0f s", PLACE_TIMEOUT_S)


def cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the kernel's and docker's list format)."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(cpu)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
