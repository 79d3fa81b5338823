"""Where the worker's threads and its containers may run: the host's CPUs.

* :class:`CpuClaims`: a worker claims a CPU host-wide with an exclusive
  ``flock`` on a file per CPU in a directory the host's workers share (the lock
  ends with the process, however that ends), so that workers on one host each
  take a different one; :meth:`CpuClaims.held_elsewhere` tells which CPUs
  other workers hold.
* :func:`cpu_ticks`: busy and total clock ticks per CPU, from /proc/stat.
* :func:`set_process_affinity`: every thread of this process on some CPUs.
* :func:`cpu_list` and :func:`online_cpus`: the kernel's list format ("0-2,5").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("fnq.agent.cpu")


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


def set_process_affinity(cpus: set[int]) -> None:
    """Every thread of this process, and those it starts later, on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


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
