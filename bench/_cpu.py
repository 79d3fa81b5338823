"""CPU time by party over timed runs: who spends what per call.

Parties are read from the kernel's counters, so the numbers cost nothing
during the runs: a process's user + system time from /proc (all its threads),
a container's from its cgroup (everything in it), the host's busy share from
/proc/stat. A container that is removed during a run drops out of the sum;
the runs measured here start none.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bench._common import labelled_ids
from worker.agent.drivers.cgroup import CgroupMeter

CLK_TCK = os.sysconf("SC_CLK_TCK")
Reading = dict[str, float]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def container_meters(tag: str) -> list[CgroupMeter]:
    """Open CPU counters of the running containers labelled ``tag``."""
    ids = labelled_ids(tag)
    if not ids:
        return []
    pids = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", *ids],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout.split()
    meters = [CgroupMeter.open(int(pid)) for pid in pids if pid.isdigit() and int(pid) > 0]
    return [m for m in meters if m is not None]


@dataclass
class CpuWatch:
    """Sums the CPU each party used over the runs between ``start`` and ``stop``."""

    processes: dict[str, Callable[[], Iterable[int]]] = field(default_factory=dict)
    own_party: str | None = None  # this process's time, under this name
    container_tag: str | None = None
    used: Reading = field(default_factory=dict)
    calls: int = 0
    busy: int = 0  # host jiffies
    total: int = 0
    _meters: list[CgroupMeter] = field(default_factory=list)
    _at: Reading = field(default_factory=dict)
    _jiffies: tuple[int, int] = (0, 0)

    def _read(self) -> Reading:
        out = {name: sum(process_cpu_s(p) for p in pids()) for name, pids in self.processes.items()}
        if self.own_party is not None:
            out[self.own_party] = time.process_time()
        if self.container_tag is not None:
            out["containers"] = sum(m.cpu_ns() for m in self._meters) / 1e9
        return out

    def start(self) -> None:
        if self.container_tag is not None:
            self.close()
            self._meters = container_meters(self.container_tag)
        self._jiffies = host_jiffies()
        self._at = self._read()

    def stop(self, calls: int) -> None:
        now = self._read()
        busy, total = host_jiffies()
        for name, value in now.items():
            self.used[name] = self.used.get(name, 0.0) + value - self._at.get(name, value)
        self.busy += busy - self._jiffies[0]
        self.total += total - self._jiffies[1]
        self.calls += calls

    def close(self) -> None:
        for meter in self._meters:
            meter.close()
        self._meters = []

    def per_call_ms(self) -> Reading:
        return {k: 1000 * v / self.calls for k, v in self.used.items()} if self.calls else {}

    def host_busy(self) -> float:
        return self.busy / self.total if self.total else 0.0
