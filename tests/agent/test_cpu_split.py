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
    """A fake host: the worker's CPU time, per-CPU ticks (100 a second), the worker's
    containers, a clock and the worker's affinity."""

    def __init__(self, cpus: set[int]) -> None:
        self.now = 0.0
        self.own = 0.0
        self.containers = 2  # the worker's live containers
        self.ticks = {cpu: (0, 0) for cpu in cpus}
        self.affinity = set(cpus)
        self.placed: list[frozenset[int] | None] = []

    def advance(self, seconds: float, worker_cores: float, busy: dict[int, float]) -> None:
        self.now += seconds
        self.own += seconds * worker_cores
        for cpu, (b, t) in self.ticks.items():
            share = busy.get(cpu, 0.0)
            self.ticks[cpu] = (b + round(100 * seconds * share), t + round(100 * seconds))

    async def place(self, cpus: frozenset[int] | None) -> None:
        self.placed.append(cpus)

    def split(self, mode: cpu_split.SplitMode, claims: CpuClaims) -> CpuSplit:
        return CpuSplit(
            mode,
            self.place,
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


Load = Callable[[bool], tuple[float, dict[int, float]]]


async def run_for(host: Host, split: CpuSplit, seconds: float, load: Load) -> None:
    """Windows of load (the worker's cores, busy share per CPU), by the split's state."""
    for _ in range(round(seconds / cpu_split.WINDOW_S)):
        cores, busy = load(split.split)
        host.advance(cpu_split.WINDOW_S, cores, busy)
        await split.tick()


def worker_at(cores: float, **busy: float) -> Load:
    return lambda _: (cores, {int(cpu[3:]): share for cpu, share in busy.items()})


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


async def test_a_busy_worker_gets_a_cpu_and_its_containers_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = Host({0, 1, 2, 3})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, 20, worker_at(0.3))
    assert not split.split and host.placed == []  # a light worker shares
    with caplog.at_level(logging.INFO, logger="fnq.agent.cpu"):
        await run_for(host, split, cpu_split.WINDOW_S, worker_at(0.8))
    assert split.split and split.worker_cpu == 3
    assert host.affinity == {3}
    assert host.placed == [frozenset({0, 1, 2})]
    assert "the worker runs on CPU 3, its containers on 0-2 (it used 0.80 of a CPU)" in (
        caplog.text
    )


async def test_a_worker_with_many_containers_per_cpu_shares(tmp_path: Path) -> None:
    host = Host({0, 1})
    split = host.split("auto", CpuClaims(tmp_path))
    host.containers = 2 * cpu_split.CONTAINERS_PER_CPU + 1  # many functions, say
    await run_for(host, split, 20, worker_at(0.8))
    assert not split.split and host.placed == []
    host.containers = 2 * cpu_split.CONTAINERS_PER_CPU
    await run_for(host, split, cpu_split.WINDOW_S, worker_at(0.8))
    assert split.split
    host.containers = 12  # more functions came: back to sharing, once the hold is over
    await run_for(host, split, cpu_split.HOLD_S, worker_at(0.8))
    assert not split.split and host.placed == [frozenset({0}), None]


async def test_the_split_ends_when_the_containers_lack_the_cpu(tmp_path: Path) -> None:
    host = Host({0, 1})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, cpu_split.WINDOW_S, worker_at(0.9))
    assert split.split and host.affinity == {1}
    # The worker goes quiet on an idle host: the split costs nothing, it stays.
    await run_for(host, split, 30, worker_at(0.05, cpu0=0.1))
    assert split.split
    # The containers' CPU full for a moment (a gap between bursts, say): no change.
    await run_for(host, split, cpu_split.CROWDED_FOR_S - 1, worker_at(0.05, cpu0=1.0))
    await run_for(host, split, cpu_split.WINDOW_S, worker_at(0.05, cpu0=0.5))
    assert split.split
    # Full all along while the worker's idles: the containers get the CPU back.
    await run_for(host, split, cpu_split.CROWDED_FOR_S, worker_at(0.05, cpu0=1.0))
    assert not split.split and host.affinity == {0, 1}
    assert host.placed == [frozenset({0}), None]


async def test_changes_are_at_least_a_hold_apart(tmp_path: Path) -> None:
    host = Host({0, 1})
    split = host.split("auto", CpuClaims(tmp_path))
    await run_for(host, split, cpu_split.WINDOW_S, worker_at(0.9))
    await run_for(host, split, cpu_split.HOLD_S - 1, worker_at(0.05, cpu0=1.0))
    assert split.split  # crowded long enough, but too soon after the split
    await run_for(host, split, 1, worker_at(0.05, cpu0=1.0))
    assert not split.split
    await run_for(host, split, cpu_split.HOLD_S - 1, worker_at(0.9))
    assert not split.split  # too soon after the end
    await run_for(host, split, 1, worker_at(0.9))
    assert split.split


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
