"""Per-call stats from a container's cgroup counters (both layouts, on files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.agent.drivers import cgroup
from worker.agent.drivers.cgroup import CgroupMeter

MIB = 1024 * 1024


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v1_counts_cpu_and_memory_and_resets_the_peak(tmp_path: Path) -> None:
    cpu = tmp_path / "cpuacct" / "docker" / "c1" / "cpuacct.usage"
    mem = tmp_path / "memory" / "docker" / "c1"
    write(cpu, "1000000000\n")
    write(mem / "memory.usage_in_bytes", f"{20 * MIB}\n")
    write(mem / "memory.max_usage_in_bytes", f"{64 * MIB}\n")
    paths = {"cpuacct": "docker/c1", "cpu": "docker/c1", "memory": "docker/c1", "": "docker/c1"}
    meter = CgroupMeter.open(1, tmp_path, paths)
    assert meter is not None
    meter.call_started()
    write(cpu, "1012500000\n")  # 12.5 ms later
    assert meter.call_ended() == {"cpu_ms": 12.5, "memory_mb": 20.0, "memory_peak_mb": 64.0}
    assert (mem / "memory.max_usage_in_bytes").read_text().startswith("0")
    assert meter.cpu_ns() == 1_012_500_000
    meter.close()
    assert meter.call_ended() == {}


def test_v1_leaves_a_peak_that_is_the_usage_alone(tmp_path: Path) -> None:
    mem = tmp_path / "memory" / "c4"
    write(tmp_path / "cpuacct" / "c4" / "cpuacct.usage", "0\n")
    write(mem / "memory.usage_in_bytes", f"{20 * MIB}\n")
    write(mem / "memory.max_usage_in_bytes", f"{20 * MIB}\n")
    meter = CgroupMeter.open(1, tmp_path, {"cpuacct": "/c4", "memory": "/c4"})
    assert meter is not None
    meter.call_started()
    assert meter.call_ended()["memory_peak_mb"] == 20.0
    # A reset would set it to the usage, which it is: nothing was written.
    assert (mem / "memory.max_usage_in_bytes").read_text() == f"{20 * MIB}\n"
    meter.close()


def test_v2_reads_usage_usec_and_memory_current(tmp_path: Path) -> None:
    group = tmp_path / "system.slice" / "docker-c2.scope"
    write(group / "cpu.stat", "usage_usec 500\nuser_usec 400\nsystem_usec 100\n")
    write(group / "memory.current", f"{3 * MIB}\n")
    meter = CgroupMeter.open(1, tmp_path, {"": "/system.slice/docker-c2.scope"})
    assert meter is not None
    meter.call_started()
    write(group / "cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n")
    assert meter.call_ended() == {"cpu_ms": 2.0, "memory_mb": 3.0}
    assert meter.cpu_ns() == 2_500_000
    meter.close()
    assert meter.cpu_ns() == 0


def test_a_call_right_after_the_last_starts_from_its_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(cgroup, "_clock", lambda: now[0])
    cpu = tmp_path / "cpuacct" / "c3" / "cpuacct.usage"
    write(cpu, "1000000000\n")
    write(tmp_path / "memory" / "c3" / "memory.usage_in_bytes", f"{MIB}\n")
    write(tmp_path / "memory" / "c3" / "memory.max_usage_in_bytes", f"{MIB}\n")
    meter = CgroupMeter.open(1, tmp_path, {"cpuacct": "/c3", "memory": "/c3"})
    assert meter is not None
    meter.call_started()
    write(cpu, "1002000000\n")
    assert meter.call_ended()["cpu_ms"] == 2.0
    write(cpu, "1002500000\n")  # the function's work after its answer
    now[0] += cgroup.BACK_TO_BACK_S / 2
    meter.call_started()  # back to back: no read of its own
    write(cpu, "1003000000\n")
    assert meter.call_ended()["cpu_ms"] == 1.0  # the work between the calls counts here
    write(cpu, "1010000000\n")  # idle for a while: not any call's
    now[0] += 1.0
    meter.call_started()
    write(cpu, "1010250000\n")
    assert meter.call_ended()["cpu_ms"] == 0.25
    meter.close()


def test_no_readable_cgroup_means_no_meter(tmp_path: Path) -> None:
    assert CgroupMeter.open(1, tmp_path, {"": "nowhere"}) is None
    assert CgroupMeter.open(1, tmp_path, {"pids": "x"}) is None
