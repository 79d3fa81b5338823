"""How much memory and CPU this worker may hand to containers, measured once.

Totals come from the host (``/proc``) and the cgroup the worker runs in (v1 or
v2), then are clamped by ``FN_MAX_TOTAL_MEMORY_BYTES`` and
``FN_MAX_TOTAL_CPU_MCPUS``. Memory keeps a head room of a tenth of what is
available, at least 256 MiB and at most 5 GiB. :mod:`worker.agent.resources`
hands these totals out as tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from config.errors import ConfigError
from config.settings import Settings

log = logging.getLogger("fnq.agent.resources")

MIB = 1024 * 1024
HEAD_ROOM_MIN_BYTES = 256 * MIB
HEAD_ROOM_MAX_BYTES = 5 * 1024 * MIB
NON_LINUX_MEMORY_BYTES = 2048 * MIB
_CGROUP_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as a huge number


@dataclass(frozen=True, slots=True)
class HostPaths:
    """Where the host's figures are read from; tests point these at fake files."""

    meminfo: Path = Path("/proc/meminfo")
    cpuinfo: Path = Path("/proc/cpuinfo")
    cgroup_v1_memory_limit: Path = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cgroup_v2_memory_max: Path = Path("/sys/fs/cgroup/memory.max")
    cgroup_v1_cfs_quota: Path = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    cgroup_v1_cfs_period: Path = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    cgroup_v2_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")

    @classmethod
    def under(cls, root: Path) -> HostPaths:
        """The same layout below ``root`` instead of ``/``."""
        base = cls()
        return cls(
            **{
                name: root / str(getattr(base, name)).lstrip("/")
                for name in cls.__dataclass_fields__
            }
        )


@dataclass(frozen=True, slots=True)
class ResourceTotals:
    memory_bytes: int
    cpu_mcpus: int


# ------------------------------------------------------------------ measuring


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _mem_available_bytes(paths: HostPaths) -> int:
    text = _read(paths.meminfo)
    if text is None:
        log.warning(
            "%s is unreadable: assuming %d MiB", paths.meminfo, NON_LINUX_MEMORY_BYTES // MIB
        )
        return NON_LINUX_MEMORY_BYTES
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip() != "MemAvailable":
            continue
        parts = rest.split()
        scale = {"kb": 1024, "mb": MIB}.get(parts[1].lower()) if len(parts) == 2 else None
        value = _int(parts[0]) if parts else None
        if scale is None or value is None:
            raise ConfigError(f"cannot read MemAvailable in {paths.meminfo}: {line.strip()!r}")
        return value * scale
    raise ConfigError(f"no MemAvailable line in {paths.meminfo} (Linux 3.14 or later is needed)")


def _cgroup_memory_limit_bytes(paths: HostPaths) -> int | None:
    limits = []
    v1 = _int(_read(paths.cgroup_v1_memory_limit))
    if v1 is not None and 0 < v1 < _CGROUP_V1_UNLIMITED:
        limits.append(v1)
    v2_text = _read(paths.cgroup_v2_memory_max)
    v2 = _int(v2_text) if v2_text is not None and v2_text.strip() != "max" else None
    if v2 is not None and v2 > 0:
        limits.append(v2)
    return min(limits) if limits else None


def _head_room_bytes(memory_bytes: int) -> int:
    return min(HEAD_ROOM_MAX_BYTES, max(HEAD_ROOM_MIN_BYTES, memory_bytes // 10))


def measure_memory_bytes(paths: HostPaths) -> int:
    memory = _mem_available_bytes(paths)
    limit = _cgroup_memory_limit_bytes(paths)
    if limit is not None:
        memory = min(memory, limit)
    return memory - _head_room_bytes(memory)


def _cpu_quota_mcpus(paths: HostPaths) -> int | None:
    quotas = []
    quota = _int(_read(paths.cgroup_v1_cfs_quota))
    period = _int(_read(paths.cgroup_v1_cfs_period))
    if quota is not None and period is not None and quota > 0 and period > 0:
        quotas.append(quota * 1000 // period)
    v2 = (_read(paths.cgroup_v2_cpu_max) or "").split()
    if len(v2) == 2 and v2[0] != "max":
        quota, period = _int(v2[0]), _int(v2[1])
        if quota is not None and period is not None and quota > 0 and period > 0:
            quotas.append(quota * 1000 // period)
    return min(quotas) if quotas else None


def measure_cpu_mcpus(paths: HostPaths) -> int:
    text = _read(paths.cpuinfo)
    count = 0
    if text is not None:
        count = sum(1 for line in text.splitlines() if line.split(":")[0].strip() == "processor")
    if count == 0:
        count = os.cpu_count() or 1
    mcpus = count * 1000
    quota = _cpu_quota_mcpus(paths)
    return min(mcpus, quota) if quota is not None else mcpus


def measure_totals(settings: Settings, paths: HostPaths | None = None) -> ResourceTotals:
    """Usable memory and CPU on this host, as the settings clamp them."""
    paths = paths or HostPaths()
    memory = measure_memory_bytes(paths)
    cpu = measure_cpu_mcpus(paths)
    if settings.max_total_memory_bytes:
        memory = min(memory, settings.max_total_memory_bytes)
    if settings.max_total_cpu_mcpus:
        cpu = min(cpu, settings.max_total_cpu_mcpus)
    if memory <= 0 or cpu <= 0:
        raise ConfigError(f"not enough resources to run functions: {memory} bytes, {cpu} mCPU")
    if memory < HEAD_ROOM_MIN_BYTES:
        log.warning("only %d MiB of memory for functions", memory // MIB)
    if cpu < 1000:
        log.warning("only %d mCPU for functions", cpu)
    return ResourceTotals(memory_bytes=memory, cpu_mcpus=cpu)
