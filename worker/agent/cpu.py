"""Is there CPU to spare? Read from the host's ``/proc/stat`` and this process's own time.

A function whose calls are short keeps its few containers busy: a call waits
for one of them to come free, not for a container that is missing. Another
container then helps only while the host has a core idle to run it and the
worker itself has time to feed it. On a saturated host each start takes a few
hundred ms of CPU from the calls, and the extra containers split the same CPU
(with several workers on one host, each would grow its own set). Up to two
containers per CPU in the worker are never held back: while one computes, the other's answer
is on its way through the worker, and calls in flight side by side let the
worker handle several per turn of its loop.

:class:`HostCpu` reads the counters at most every ``MIN_WINDOW_S``, when a
call ends (:meth:`~HostCpu.touch`) or when the launcher asks: no task of its
own. Its answer is the verdict on the last window, which while calls keep
ending is at most a few tenths of a second old. A window longer than
``MAX_WINDOW_S`` would mostly tell of a quiet spell before the load of the
moment, so it gives no verdict: the answer is "saturated" until the next one
(a launch held back is asked for again within one hot-poll interval). Where
``/proc/stat`` cannot be read, it never says saturated (the launcher's other
rules still hold).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger("fnq.agent.cpu")

MIN_WINDOW_S = 0.1  # shorter windows count too few clock ticks (100 per second per CPU)
MAX_WINDOW_S = 0.25  # longer ones tell of the past
WORKER_BUSY_CORES = 0.9  # the worker's event loop is the bottleneck above this
FREE_PER_CPU = 2  # containers per CPU that grow without a look at the load


class CpuGauge(Protocol):
    def touch(self) -> None:
        """A call has ended (keeps the gauge's window recent)."""
        ...

    def saturated(self, containers: int) -> bool:
        """True when another container beside a function's ``containers`` would find
        no CPU to run on."""
        ...


class NeverSaturated:
    """A gauge for when the check is off."""

    def touch(self) -> None:
        pass

    def saturated(self, containers: int) -> bool:
        return False


class HostCpu:
    def __init__(
        self,
        spare_mcpus: int,
        *,
        stat_path: Path = Path("/proc/stat"),
        clock: Callable[[], float] = time.monotonic,
        own_cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.spare_cores = spare_mcpus / 1000.0
        self.free_containers = FREE_PER_CPU * cpu_count()
        self._path = stat_path
        self._clock = clock
        self._own_cpu = own_cpu
        self._last = False
        self._base = self._sample()

    def _sample(self) -> tuple[float, float, int, int] | None:
        """(time, own CPU seconds, idle ticks, all ticks) over every CPU; None if unknown."""
        try:
            with self._path.open("rb") as stat:
                fields = stat.readline().split()
        except OSError as exc:
            log.debug("no host CPU counters (%s): containers grow without this check", exc)
            return None
        if len(fields) < 5 or fields[0] != b"cpu":
            return None
        ticks = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return self._clock(), self._own_cpu(), idle, sum(ticks)

    def touch(self) -> None:
        base = self._base
        if base is not None and self._clock() - base[0] >= MIN_WINDOW_S:
            self._roll(base)

    def _roll(self, base: tuple[float, float, int, int]) -> None:
        """Judge the window since ``base`` and start the next one."""
        now = self._sample()
        self._base = now
        if now is None:
            self._last = False
            return
        elapsed, all_ticks = now[0] - base[0], now[3] - base[3]
        if elapsed > MAX_WINDOW_S:
            self._last = True  # no verdict on a window this long: wait for the next
        elif all_ticks > 0:
            idle_cores = (now[2] - base[2]) / all_ticks * cpu_count()
            worker_cores = (now[1] - base[1]) / elapsed
            self._last = idle_cores < self.spare_cores or worker_cores > WORKER_BUSY_CORES

    def saturated(self, containers: int) -> bool:
        if self._base is None or containers < self.free_containers:
            return False
        self.touch()
        return self._last


def cpu_count() -> int:
    return os.cpu_count() or 1


def gauge(spare_mcpus: int) -> CpuGauge:
    """The gauge for the ``hot_grow_spare_mcpus`` setting (0 = no check)."""
    return HostCpu(spare_mcpus) if spare_mcpus > 0 else NeverSaturated()
