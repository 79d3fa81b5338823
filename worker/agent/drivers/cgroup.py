"""Per-call resource use of a container, read from its cgroup.

The engine puts each container in a cgroup of its own; the kernel counts the
CPU time and memory of everything in it. A worker on the same host (root, or
allowed to read /sys/fs/cgroup) opens the counters once when the container is
ready and re-reads them with ``pread`` around each call: no engine request on
the call's path.

Per call (the ``stats`` of its ``DispatchResult``):

* ``cpu_ms``: CPU time the container used during the call;
* ``memory_mb``: memory in use when the call ended;
* ``memory_peak_mb`` (cgroup v1 only): the most it used since the last call
  ended (the kernel's high-water mark, reset after each call that raised it
  above the usage: most calls of a steady function leave it there, and the
  reset, a write, is skipped).

A call that follows the container's previous call within ``BACK_TO_BACK_S``
starts from that call's closing CPU reading instead of a reading of its own:
in a burst this halves the CPU reads, each several microseconds on a busy
host. What the function does after it has answered (between the two calls)
then counts in the next call rather than in none.

Both cgroup layouts are read: v2 (one unified tree: ``cpu.stat`` and
``memory.current``) and v1 (``cpuacct.usage`` and ``memory.usage_in_bytes``
in per-controller trees). A container whose cgroup cannot be found or read
simply has no stats.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIB = 1024 * 1024
_READ_BYTES = 4096
BACK_TO_BACK_S = 0.005
_clock = time.monotonic


def _paths(pid: int) -> dict[str, str]:
    """Controller -> cgroup path of ``pid`` ("" for the unified v2 tree)."""
    out: dict[str, str] = {}
    text = Path(f"/proc/{pid}/cgroup").read_text()
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


class CgroupMeter:
    """Open counters of one container's cgroup."""

    def __init__(self, cpu_fd: int, cpu_ns_per_unit: int, mem_fd: int, peak_fd: int | None):
        self._cpu_fd = cpu_fd
        self._cpu_scale = cpu_ns_per_unit
        self._mem_fd = mem_fd
        self._peak_fd = peak_fd
        self._cpu_at_start = 0
        self._cpu_at_end = 0
        self._ended_at = float("-inf")  # _clock() of the last call_ended that read the CPU
        self.closed = False

    @classmethod
    def open(
        cls, pid: int, root: Path = CGROUP_ROOT, paths: dict[str, str] | None = None
    ) -> CgroupMeter | None:
        """The meter of the cgroup ``pid`` is in (``paths``: controller -> cgroup path,
        read from /proc when not given), or None when it cannot be read."""
        fds: list[int] = []
        try:
            paths = {k: v.lstrip("/") for k, v in (_paths(pid) if paths is None else paths).items()}
            if "cpuacct" in paths and "memory" in paths:  # v1
                cpu = root / "cpuacct" / paths["cpuacct"] / "cpuacct.usage"
                mem_dir = root / "memory" / paths["memory"]
                fds.append(os.open(cpu, os.O_RDONLY))
                fds.append(os.open(mem_dir / "memory.usage_in_bytes", os.O_RDONLY))
                fds.append(os.open(mem_dir / "memory.max_usage_in_bytes", os.O_RDWR))
                meter = cls(fds[0], 1, fds[1], fds[2])
            elif "" in paths:  # v2
                group = root / paths[""]
                fds.append(os.open(group / "cpu.stat", os.O_RDONLY))
                fds.append(os.open(group / "memory.current", os.O_RDONLY))
                meter = cls(fds[0], 1000, fds[1], None)
            else:
                return None
            meter._cpu_at_start = meter._cpu_units()  # proves the counters can be read
        except (OSError, ValueError):
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return None
        return meter

    def _cpu_units(self) -> int:
        text = os.pread(self._cpu_fd, _READ_BYTES, 0)
        if self._cpu_scale == 1:  # v1: nanoseconds, one number
            return int(text)
        for line in text.splitlines():  # v2: "usage_usec N" among others
            key, _, value = line.partition(b" ")
            if key == b"usage_usec":
                return int(value)
        raise ValueError("cpu.stat has no usage_usec")

    def cpu_ns(self) -> int:
        """CPU time the cgroup has used so far, in nanoseconds (0 once closed)."""
        if self.closed:
            return 0
        try:
            return self._cpu_units() * self._cpu_scale
        except (OSError, ValueError):
            return 0

    def call_started(self) -> None:
        if self.closed:
            return
        if _clock() - self._ended_at < BACK_TO_BACK_S:
            self._cpu_at_start = self._cpu_at_end  # right after the last call: its reading
            return
        with contextlib.suppress(OSError, ValueError):
            self._cpu_at_start = self._cpu_units()

    def call_ended(self) -> dict[str, float]:
        """The call's use since ``call_started`` (empty if the counters are gone)."""
        if self.closed:
            return {}
        try:
            cpu = self._cpu_units()
            self._cpu_at_end, self._ended_at = cpu, _clock()
            cpu_ns = (cpu - self._cpu_at_start) * self._cpu_scale
            memory = int(os.pread(self._mem_fd, 64, 0))
            stats = {"cpu_ms": round(cpu_ns / 1e6, 3), "memory_mb": round(memory / MIB, 2)}
            if self._peak_fd is not None:
                peak = int(os.pread(self._peak_fd, 64, 0))
                stats["memory_peak_mb"] = round(peak / MIB, 2)
                if peak > memory:  # a reset sets the mark to the usage: else it is there
                    os.pwrite(self._peak_fd, b"0", 0)  # the next call's peak starts here
        except (OSError, ValueError):
            return {}
        return stats

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True  # the numbers may be reused by other files from now on
        for fd in (self._cpu_fd, self._mem_fd, self._peak_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
