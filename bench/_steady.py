"""How steadily the host gave its CPUs over a run: a probe times a fixed bit of work.

A shared VM's CPUs can slow down for tens of milliseconds at a time, whatever
runs inside it: the hypervisor gives a virtual CPU less of a real one. Calls
arriving at a steady pace then pile up in every party at once (worker,
containers, redis-server, producer), and such a window makes a run's p99.

The probe is a process of its own that, every ``EVERY_S``, times ``CHUNK``
additions of Python integers and records (start, seconds). Under the
real-time policy ``SCHED_FIFO`` (when this user may set it), no task inside
the host delays it: a chunk that takes longer than its best means the CPU
itself ran slower. A window whose median chunk took at least ``SLOW_FACTOR``
times the probe's best (its 5th percentile over the whole run) counts as a
slow window. The probe costs about 1 % of one CPU (a few microseconds every
2 ms, more in slow windows).

    probe = SteadyProbe(tmp / "steady.bin").start()
    ...                                         # timed runs, each (t0, t1) by time.monotonic()
    probe.stop()
    probe.slow_share(t0, t1)                    # share of that span's windows that were slow
"""

from __future__ import annotations

import array
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EVERY_S = 0.004
CHUNK = 300  # additions per timed chunk: about 15 us at full speed here
WINDOW_S = 0.05
SLOW_FACTOR = 4.0
BEST_PERCENTILE = 5
STOP_TIMEOUT_S = 10.0


class SteadyProbe:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self.realtime = False  # the probe ran under SCHED_FIFO
        self._starts: list[float] = []
        self._seconds: list[float] = []
        self.best_s = 0.0

    def start(self) -> SteadyProbe:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench._steady", str(self.path)],
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        self.realtime = self._proc.stdout.readline().strip() == b"realtime"
        return self

    def stop(self) -> None:
        """Stop the probe and load what it measured."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return
        data = array.array("d")
        data.frombytes(self.path.read_bytes())
        self._starts = list(data[0::2])
        self._seconds = list(data[1::2])
        if self._seconds:
            ordered = sorted(self._seconds)
            self.best_s = ordered[len(ordered) * BEST_PERCENTILE // 100]

    def windows(self, t0: float, t1: float) -> list[float]:
        """Each ``WINDOW_S`` window of [t0, t1): its median chunk / the best chunk."""
        if not self.best_s:
            return []
        count = max(1, int((t1 - t0) / WINDOW_S))
        slots: list[list[float]] = [[] for _ in range(count)]
        for start, seconds in zip(self._starts, self._seconds, strict=True):
            if t0 <= start < t1:
                slots[min(count - 1, int((start - t0) / WINDOW_S))].append(seconds)
        out = []
        for slot in slots:
            if slot:
                slot.sort()
                out.append(slot[len(slot) // 2] / self.best_s)
        return out

    def slow_share(self, t0: float, t1: float) -> float:
        """The share of [t0, t1)'s windows that were slow (NaN: nothing measured)."""
        found = self.windows(t0, t1)
        if not found:
            return float("nan")
        return sum(1 for factor in found if factor >= SLOW_FACTOR) / len(found)


def _probe(path: Path) -> None:
    realtime = False
    policy = getattr(os, "SCHED_FIFO", None)
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(os.sched_get_priority_min(policy)))
            realtime = True
        except OSError:  # not allowed here: a plain process measures its turns too
            pass
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("realtime" if realtime else "normal", flush=True)
    data = array.array("d")
    clock, pause = time.monotonic, time.sleep
    while not stopping:
        started = clock()
        total = 0
        for i in range(CHUNK):
            total += i
        data.append(started)
        data.append(clock() - started)
        pause(EVERY_S)
    path.write_bytes(data.tobytes())


if __name__ == "__main__":
    _probe(Path(sys.argv[1]))
