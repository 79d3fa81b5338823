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
rules still hold). While the worker has a CPU of its own (:mod:`cpu_split`),
the idle CPU counted is that of the CPUs its containers run on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

log = logging.getLogger("fnq.agent.cpu")

MIN_WINDOW_S = 0.1  # shorter windows count too few clock ticks (100 per second per CPU)
MAX_WINDOW_S = 0.25  # longer ones tell of the past
WORKER_BUSY_CORES = 0.9  # the worker's event loop is the bottleneck above this
FREE_PER_CPU = 2  # containers per CPU that grow without a look at the load
Sample = tuple[float, float, dict[int, tuple[int, int]]]


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
        containers_on: Callable[[], frozenset[int] | None] = lambda: None,
    ) -> None:
        self.spare_cores = spare_mcpus / 1000.0
        self.free_containers = FREE_PER_CPU * cpu_count()
        self._path = stat_path
        self._clock = clock
        self._own_cpu = own_cpu
        self._containers_on = containers_on  # the CPUs containers may use (None: all)
        self._last = False
        self._base = self._sample()

    def _sample(self) -> Sample | None:
        """(time, own CPU seconds, CPU -> (idle, all) ticks) with -1 for all CPUs
        together; None if unknown."""
        ticks: dict[int, tuple[int, int]] = {}
        try:
            with self._path.open("rb") as stat:
                for line in stat:
                    if not line.startswith(b"cpu"):
                        break  # the CPU lines come first
                    name, *fields = line.split()
                    values = [int(f) for f in fields[:8]]  # user nice system idle iowait ...
                    if len(values) < 4:
                        continue
                    idle = values[3] + (values[4] if len(values) > 4 else 0)
                    ticks[int(name[3:]) if name != b"cpu" else -1] = (idle, sum(values))
        except (OSError, ValueError) as exc:
            log.debug("no host CPU counters (%s): containers grow without this check", exc)
            return None
        if -1 not in ticks:
            return None
        return self._clock(), self._own_cpu(), ticks

    def touch(self) -> None:
        base = self._base
        if base is not None and self._clock() - base[0] >= MIN_WINDOW_S:
            self._roll(base)

    def _roll(self, base: Sample) -> None:
        """Judge the window since ``base`` and start the next one."""
        now = self._sample()
        self._base = now
        if now is None:
            self._last = False
            return
        elapsed = now[0] - base[0]
        cpus: Collection[int] = self._containers_on() or ()
        if not cpus or any(c not in now[2] or c not in base[2] for c in cpus):
            cpus, count = (-1,), cpu_count()  # every CPU
        else:
            count = len(cpus)
        idle = sum(now[2][c][0] - base[2][c][0] for c in cpus)
        all_ticks = sum(now[2][c][1] - base[2][c][1] for c in cpus)
        if elapsed > MAX_WINDOW_S:
            self._last = True  # no verdict on a window this long: wait for the next
        elif all_ticks > 0:
            idle_cores = idle / all_ticks * count
            worker_cores = (now[1] - base[1]) / elapsed
            self._last = idle_cores < self.spare_cores or worker_cores > WORKER_BUSY_CORES

    def saturated(self, containers: int) -> bool:
        if self._base is None or containers < self.free_containers:
            return False
        self.touch()
        return self._last


def cpu_count() -> int:
    return os.cpu_count() or 1


def gauge(
    spare_mcpus: int, containers_on: Callable[[], frozenset[int] | None] = lambda: None
) -> CpuGauge:
    """The gauge for the ``hot_grow_spare_mcpus`` setting (0 = no check); the idle
    CPU counted is that of ``containers_on()`` (None: of every CPU)."""
    if spare_mcpus <= 0:
        return NeverSaturated()
    return HostCpu(spare_mcpus, containers_on=containers_on)
