"""The benchmarks' CPU accounting (bench._cpu) on this process alone."""

from __future__ import annotations

import os
import time

from bench._cpu import CpuWatch, host_jiffies, process_cpu_s


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_a_process_s_cpu_time_is_read_from_proc() -> None:
    before = process_cpu_s(os.getpid())
    _spin(0.2)
    assert 0.17 <= process_cpu_s(os.getpid()) - before <= 0.4  # clock ticks: 10 ms apart
    assert process_cpu_s(2**22 + 7) == 0.0  # no such process


def test_the_host_counts_busy_time_within_its_total() -> None:
    busy, total = host_jiffies()
    _spin(0.05)
    busy2, total2 = host_jiffies()
    assert 0 < busy2 - busy <= total2 - total


def test_a_watch_sums_each_party_over_its_runs_per_call() -> None:
    me = os.getpid()
    watch = CpuWatch(processes={"spinner": lambda: [me]}, own_party="self")
    for _ in range(2):
        watch.start()
        _spin(0.2)
        watch.stop(calls=10)
    _spin(0.2)  # between runs: not counted
    per_call = watch.per_call_ms()
    assert watch.calls == 20
    assert 19.5 <= per_call["self"] <= 25  # 400 ms over 20 calls, and the reads around them
    assert 17 <= per_call["spinner"] <= 27  # the same time, in whole clock ticks
    assert 0.0 < watch.host_busy() <= 1.0
