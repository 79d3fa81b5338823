"""The worker's own CPU and its containers' (worker.agent.cpu_split), on fakes:
claims in a temporary directory, a fake clock, CPU counters and affinity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import AgentFactory, make_call, make_fn
from worker.agent import cpu_split
from worker.agent.cpu_place import CpuClaims, cpu_list
from worker.agent.cpu_split import CpuSplit
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver


class Host:
    """A fake host: the worker's CPU time, per-CPU ticks (100 a second), the calls
    ended, a clock and the worker's affinity."""

    def __init__(self, cpus: set[int]) -> None:
        self.now = 0.0
        self.own = 0.0
        self.calls = 0
        self.containers = 2
        self.ticks = {cpu: (0, 0) for cpu in cpus}
        self.affinity = set(cpus)
        self.placed: list[frozenset[int] | None] = []

    def advance(
        self, seconds: float, worker_cores: float, busy: dict[int, float], calls: int = 0
    ) -> None:
        self.now += seconds
        self.own += seconds * worker_cores
        self.calls += calls
        for cpu, (b, t) in self.ticks.items():
            share = busy.get(cpu, 0.0)
            self.ticks[cpu] = (b + round(100 * seconds * share), t + round(100 * seconds))

    async def place(self, cpus: frozenset[int] | None) -> None:
        self.placed.append(cpus)

    def split(self, mode: cpu_split.SplitMode, claims: CpuClaims) -> CpuSplit:
        return CpuSplit(
            mode,
            self.place,
            calls_ended=lambda: self.calls,
            containers=lambda: self.containers,
            claims=claims,
            cpus=set(self.ticks),
            own_cpu=lambda: self.own,
            clock=lambda: self.now,
            set_affinity=self._set_affinity,
            ticks=lambda: dict(self.ticks),
        )

    def _set_affinity(self, cpus: set[int]) -> None:
        self.affinity = set(cpus)


Load = Callable[[bool], tuple[float, dict[int, float], int]]


async def run_for(host: Host, split: CpuSplit, seconds: float, load: Load) -> None:
    """Windows of load (worker cores, busy share per CPU, calls a second), by state."""
    for _ in range(round(seconds / cpu_split.WINDOW_S)):
        cores, busy, rate = load(split.split)
        host.advance(cpu_split.WINDOW_S, cores, busy, round(rate * cpu_split.WINDOW_S))
        await split.tick()


def short_calls(split_busy: float, shared_busy: float = 0.6) -> Load:
    """A busy worker at 2,000 calls/s; the host's CPUs this busy split and shared."""

    def load(split: bool) -> tuple[float, dict[int, float], int]:
        share = split_busy if split else shared_busy
        return 0.8, dict.fromkeys(range(4), share), 2000

    return load


def test_cpu_lists_are_written_as_the_kernel_writes_them() -> None:
    assert cpu_list({0, 1, 2, 5}) == "0-2,5"
    assert cpu_list({3}) == "3"
    assert cpu_list([7, 1, 2, 4, 5]) == "1-2,4-5,7"


def test_workers_on_one_host_claim_different_cpus(tmp_path: Path) -> None:
    first, second = CpuClaims(tmp_path), CpuClaims(tmp_path)
    assert first.claim({0, 1, 2, 3}) == 3  # the highest first
    assert second.claim({0, 1, 2, 3}) == 2
    assert first.held_elsewhere({0, 1, 2, 3}) == {2}
    assert second.held_elsewhere({0, 1, 2, 3}) == {3}
    second.release()
    assert first.held_elsewhere({0, 1, 2, 3}) == set()
    first.release()
    assert CpuClaims(tmp_path).claim({0, 1, 2, 3}) == 3


async def test_a_busy_worker_keeps_a_split_that_costs_the_host_less(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    with caplog.at_level(logging.INFO, logger="fnq.agent.cpu"):
        await run_for(host, split, 2 * cpu_split.PROBE_S + 2, short_calls(split_busy=0.5))
    assert split.split and split.worker_cpu == 3
    assert host.affinity == {3}
    assert host.placed == [frozenset({0, 1, 2})]
    assert "host CPU per call 1000 us split, 1200 us shared" in caplog.text
    await run_for(host, split, cpu_split.HOLD_S - 6, short_calls(split_busy=0.5))
    assert host.placed == [frozenset({0, 1, 2})]  # the verdict holds: no probe


async def test_a_split_that_costs_more_is_undone_and_tried_again_later(tmp_path: Path) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, 2 * cpu_split.PROBE_S + 2, short_calls(split_busy=0.6))
    assert not split.split and host.affinity == {0, 1, 2, 3}
    assert host.placed == [frozenset({0, 1, 2}), None]  # tried, and undone (no gain)
    await run_for(host, split, cpu_split.HOLD_S - 6, short_calls(split_busy=0.6))
    assert len(host.placed) == 2
    await run_for(host, split, 10, short_calls(split_busy=0.6))
    assert len(host.placed) == 4  # probed again once the verdict was old


async def test_a_worker_with_many_containers_per_cpu_shares(tmp_path: Path) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    host.containers = 9  # over two per CPU: many functions, say
    await run_for(host, split, 20, short_calls(split_busy=0.3))
    assert not split.split and host.placed == []
    host.containers = 8
    await run_for(host, split, 2 * cpu_split.PROBE_S + 2, short_calls(split_busy=0.3))
    assert split.split
    host.containers = 12  # more functions came: back to sharing at once
    await run_for(host, split, cpu_split.WINDOW_S, short_calls(split_busy=0.3))
    assert not split.split and host.placed == [frozenset({0, 1, 2}), None]


async def test_a_worker_that_is_not_busy_never_probes(tmp_path: Path) -> None:
    host = Host({0, 1})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, 60, lambda _: (0.3, {0: 0.9, 1: 0.9}, 1000))
    assert not split.split and host.placed == []


async def test_a_probe_whose_load_goes_away_leaves_things_as_they_were(tmp_path: Path) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, cpu_split.PROBE_S + 1, short_calls(split_busy=0.4))
    assert split.split  # the probe's second half
    await run_for(host, split, cpu_split.PROBE_LIMIT_S - 4, lambda _: (0.1, {}, 10))
    assert split.split  # quiet windows are not measured: the probe waits for load
    await run_for(host, split, 4, lambda _: (0.1, {}, 10))
    assert not split.split and host.placed == [frozenset({0, 1, 2}), None]


async def test_bursts_with_quiet_gaps_are_measured_by_their_busy_windows(tmp_path: Path) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    busy = short_calls(split_busy=0.5)
    for _ in range(12):  # a burst of one window, then a gap of one
        await run_for(host, split, cpu_split.WINDOW_S, busy)
        await run_for(host, split, cpu_split.WINDOW_S, lambda _: (0.05, {}, 0))
    assert split.split and host.placed == [frozenset({0, 1, 2})]


async def test_a_split_ends_early_when_its_containers_lack_the_cpu(tmp_path: Path) -> None:
    host = Host({0, 1})
    split = host.split("auto", CpuClaims(tmp_path))
    assert await split.start_split()
    split.verdict_at = host.now
    # The worker goes quiet on an idle host: the split costs nothing, it stays.
    await run_for(host, split, 20, lambda _: (0.05, {0: 0.1}, 5))
    assert split.split
    # The containers' CPU is full while the worker's idles: they get it back.
    await run_for(host, split, 0.5, lambda _: (0.05, {0: 1.0}, 5))
    assert not split.split and host.affinity == {0, 1}
    assert host.placed == [frozenset({0}), None]


async def test_no_split_without_a_cpu_left_for_the_containers(tmp_path: Path) -> None:
    other = CpuClaims(tmp_path)
    assert other.claim({0, 1}) == 1  # another worker on this host
    host = Host({0, 1})
    split = host.split("on", CpuClaims(tmp_path))
    assert not await split.start_split()
    assert host.affinity == {0, 1} and host.placed == []
    assert other.held_elsewhere({0, 1}) == set()  # the claim on CPU 0 was let go


async def test_one_cpu_never_splits(tmp_path: Path) -> None:
    host = Host({0})
    split = host.split("on", CpuClaims(tmp_path))
    assert not await split.start_split()
    assert host.affinity == {0} and host.placed == []


async def test_on_splits_at_once_and_the_end_restores_the_process(tmp_path: Path) -> None:
    host = Host({0, 1, 2})
    claims = CpuClaims(tmp_path)
    split = host.split("on", claims)
    task = asyncio.create_task(split.run())
    await asyncio.sleep(0)
    assert host.affinity == {2} and host.placed == [frozenset({0, 1})]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert host.affinity == {0, 1, 2} and claims.cpu is None


async def test_the_agent_runs_the_split_while_it_is_open(
    agents: AgentFactory, tmp_path: Path
) -> None:
    host = Host({0, 1})
    driver = FakeDriver(FakeBehaviour())
    split = CpuSplit(
        "on",
        driver.place,
        claims=CpuClaims(tmp_path),
        cpus={0, 1},
        set_affinity=host._set_affinity,
        ticks=lambda: dict(host.ticks),
    )
    agent = agents(driver)
    agent.cpu_split = split
    async with agent:
        fn = make_fn()
        assert (await agent.submit(make_call(fn), fn)).error is None
        assert host.affinity == {1} and driver.placements == [frozenset({0})]
    assert host.affinity == {0, 1}


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_the_setting_names_the_mode(mode: str, agents: AgentFactory) -> None:
    assert agents(cpu_split=mode).cpu_split.mode == mode
