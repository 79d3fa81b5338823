"""The CPU gauge that holds back containers of short functions on a saturated host."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.agent import cpu
from worker.agent.cpu import MAX_WINDOW_S, MIN_WINDOW_S, HostCpu, NeverSaturated, gauge

MANY = 100  # containers of the function: more than grow without a look at the load


class Counters:
    """A /proc/stat on file, a clock and the worker's CPU time, all moved by hand."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "stat"
        self.now = 100.0
        self.own = 5.0
        self.busy = 0
        self.idle = 0
        self.write()

    def write(self) -> None:
        # user nice system idle iowait irq softirq steal
        self.path.write_text(f"cpu  {self.busy} 0 0 {self.idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    def advance(self, seconds: float, idle_cores: float, worker_cores: float = 0.0) -> None:
        ticks = round(seconds * 100 * 2)  # two CPUs, 100 ticks per second each
        idle = round(seconds * 100 * idle_cores)
        self.idle += idle
        self.busy += ticks - idle
        self.now += seconds
        self.own += seconds * worker_cores
        self.write()

    def gauge(self, spare_mcpus: int = 500) -> HostCpu:
        return HostCpu(
            spare_mcpus, stat_path=self.path, clock=lambda: self.now, own_cpu=lambda: self.own
        )


@pytest.fixture
def counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Counters:
    monkeypatch.setattr(cpu, "cpu_count", lambda: 2)
    return Counters(tmp_path)


@pytest.mark.parametrize(
    ("idle_cores", "worker_cores", "saturated"),
    [
        (1.5, 0.3, False),
        (0.6, 0.5, False),
        (0.4, 0.5, True),  # less than 500 mCPU idle
        (0.0, 0.9, True),
        (1.0, 0.95, True),  # the worker's own loop is the bottleneck
    ],
)
def test_saturated_from_idle_host_cpu_and_the_workers_own(
    counters: Counters, idle_cores: float, worker_cores: float, saturated: bool
) -> None:
    g = counters.gauge()
    counters.advance(0.2, idle_cores, worker_cores)
    assert g.saturated(MANY) is saturated


def test_up_to_two_containers_per_cpu_grow_whatever_the_load(counters: Counters) -> None:
    g = counters.gauge()
    counters.advance(0.2, idle_cores=0.0, worker_cores=1.0)
    assert not g.saturated(3)  # two CPUs: four containers free of the check
    assert g.saturated(4)


def test_a_window_shorter_than_the_minimum_keeps_the_last_answer(counters: Counters) -> None:
    g = counters.gauge()
    counters.advance(0.2, idle_cores=0.1)
    assert g.saturated(MANY)
    counters.advance(MIN_WINDOW_S / 2, idle_cores=2.0)
    assert g.saturated(MANY)  # too short to read: the same answer
    counters.advance(MIN_WINDOW_S, idle_cores=2.0)
    assert not g.saturated(MANY)  # a new window, idle since the last read


def test_after_a_quiet_spell_the_answer_waits_for_a_fresh_window(counters: Counters) -> None:
    g = counters.gauge()
    counters.advance(5.0, idle_cores=2.0)  # a quiet spell, then a question
    assert g.saturated(MANY)  # not known yet
    counters.advance(MIN_WINDOW_S / 2, idle_cores=2.0)
    assert g.saturated(MANY)
    counters.advance(MIN_WINDOW_S, idle_cores=2.0)
    assert not g.saturated(MANY)  # the window since that question: idle
    counters.advance(MAX_WINDOW_S / 2, idle_cores=0.0)  # a burst: only the burst counts
    assert g.saturated(MANY)


def test_no_counters_never_saturated(tmp_path: Path) -> None:
    g = HostCpu(500, stat_path=tmp_path / "missing")
    assert not g.saturated(MANY)
    (tmp_path / "bad").write_text("intr 1 2 3\n")
    assert not HostCpu(500, stat_path=tmp_path / "bad").saturated(MANY)


def test_zero_turns_the_check_off() -> None:
    assert isinstance(gauge(0), NeverSaturated)
    assert isinstance(gauge(500), HostCpu)


def test_the_real_counters_can_be_read() -> None:
    g = HostCpu(0)
    assert g._base is not None  # this host has /proc/stat


def test_calls_that_end_keep_the_window_recent(counters: Counters) -> None:
    g = counters.gauge()
    for _ in range(20):  # two seconds of calls ending, the host mostly idle
        counters.advance(MIN_WINDOW_S, idle_cores=1.5)
        g.touch()
    counters.advance(MIN_WINDOW_S / 2, idle_cores=1.5)
    assert not g.saturated(MANY)  # a verdict at once, on the last window
    for _ in range(3):  # then the host gets busy
        counters.advance(MIN_WINDOW_S, idle_cores=0.1)
        g.touch()
    assert g.saturated(MANY)


def test_while_split_only_the_containers_cpus_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's CPU 1 idles, the containers' CPU 0 is full: no room to grow.
    monkeypatch.setattr(cpu, "cpu_count", lambda: 2)
    path, now = tmp_path / "stat", [100.0]

    def write(cpu0: tuple[int, int], cpu1: tuple[int, int]) -> None:
        (b0, i0), (b1, i1) = cpu0, cpu1
        path.write_text(
            f"cpu  {b0 + b1} 0 0 {i0 + i1} 0 0 0 0\ncpu0 {b0} 0 0 {i0} 0 0 0 0\n"
            f"cpu1 {b1} 0 0 {i1} 0 0 0 0\nintr 1 2 3\n"
        )

    split: list[frozenset[int] | None] = [frozenset({0})]
    write((0, 0), (0, 0))
    g = HostCpu(500, stat_path=path, clock=lambda: now[0], own_cpu=lambda: 0.0,
                containers_on=lambda: split[0])  # fmt: skip
    now[0] += 0.2
    write((20, 0), (2, 18))  # CPU 0 busy, CPU 1 90 % idle
    assert g.saturated(MANY)
    split[0] = None  # shared: the host as a whole has 0.9 of a CPU idle
    now[0] += 0.2
    write((40, 0), (4, 36))
    assert not g.saturated(MANY)
