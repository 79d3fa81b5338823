"""Past two containers per CPU, the launcher grows a short function whose containers
cycle only while they are busy most of the time and the CPU gauge allows it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.agent.conftest import FixedCpu, make_fn, make_settings, tracker
from worker.agent.evictor import Evictor
from worker.agent.launcher import Launcher
from worker.agent.resources import ResourceToken
from worker.agent.slots import Caller, ContainerState, SlotQueue, slot_key


def launcher(
    tmp_path: Path, cpu: FixedCpu, worker_containers: int | None = None, **settings: object
) -> tuple[Launcher, list[ResourceToken]]:
    fn = make_fn()
    queue = SlotQueue(slot_key(fn), fn)
    started: list[ResourceToken] = []
    resources = tracker()

    def start(q: SlotQueue, token: ResourceToken, owner: Caller | None) -> None:
        started.append(token)

    made = Launcher(
        queue,
        settings=make_settings(tmp_path / "data", **settings),
        tracker=resources,
        evictor=Evictor(on_idle_change=resources.lent_changed),
        start_container=start,
        drop_queue=lambda q: False,
        cpu=cpu,
        free_containers=4,
        worker_containers=None if worker_containers is None else lambda: worker_containers,
    )
    return made, started


def busy_short_calls(queue: SlotQueue, freed_ago_s: float) -> None:
    """Five busy containers of 2 ms calls, the last freed ``freed_ago_s`` ago; two calls
    have asked for a container."""
    queue.containers[ContainerState.BUSY] = 5
    queue.asking = 2
    queue.held(0.002, now=asyncio.get_running_loop().time() - freed_ago_s)


@pytest.mark.parametrize(("saturated", "launched"), [(True, 0), (False, 1)])
async def test_a_saturated_cpu_holds_back_a_container_for_cycling_short_calls(
    tmp_path: Path, saturated: bool, launched: int
) -> None:
    cpu = FixedCpu(saturated)
    made, started = launcher(tmp_path, cpu)
    busy_short_calls(made.queue, freed_ago_s=0.001)
    assert await made.check_launch(None) is False
    assert cpu.asked == 1 and len(started) == launched
    assert made.queue.containers[ContainerState.WAIT] == launched  # held for the start


async def test_containers_stuck_in_calls_get_company_whatever_the_cpu(tmp_path: Path) -> None:
    cpu = FixedCpu(saturated=True)
    made, started = launcher(tmp_path, cpu)
    busy_short_calls(made.queue, freed_ago_s=1.0)  # none came free for a second
    await made.check_launch(None)
    assert cpu.asked == 0 and len(started) == 1


async def test_long_calls_never_ask_the_cpu(tmp_path: Path) -> None:
    cpu = FixedCpu(saturated=True)
    made, started = launcher(tmp_path, cpu)
    busy_short_calls(made.queue, freed_ago_s=0.001)
    made.queue.quick_s = made.queue.call_s = 0.5
    await made.check_launch(None)
    assert cpu.asked == 0 and len(started) == 1


def seldom_busy(queue: SlotQueue, containers: int) -> None:
    """``containers`` busy now, after a quarter second in which they held two 2 ms calls
    (busy under 1 % of the time), the last freed a moment ago; two calls asked."""
    now = asyncio.get_running_loop().time()
    queue.containers[ContainerState.BUSY] = containers
    queue.asking = 2
    queue.held(0.002, now=now - 0.3)
    queue.held(0.002, now=now - 0.001)


async def test_containers_busy_a_moment_at_a_time_do_not_grow_past_two_per_cpu(
    tmp_path: Path,
) -> None:
    cpu = FixedCpu(saturated=False)
    made, started = launcher(tmp_path, cpu)
    seldom_busy(made.queue, containers=5)
    assert made.queue.busy_share(asyncio.get_running_loop().time()) < 0.01
    await made.check_launch(None)
    assert started == [] and made.queue.containers[ContainerState.WAIT] == 0


async def test_below_two_per_cpu_a_short_function_grows_however_idle(tmp_path: Path) -> None:
    cpu = FixedCpu(saturated=True)
    made, started = launcher(tmp_path, cpu)
    seldom_busy(made.queue, containers=3)
    await made.check_launch(None)
    assert cpu.asked == 0 and len(started) == 1


@pytest.mark.parametrize(("others", "launched"), [(1, 1), (6, 0)])
async def test_the_floor_counts_the_containers_of_every_function(
    tmp_path: Path, others: int, launched: int
) -> None:
    """One container of this function beside ``others`` of other functions: past two
    per CPU in the worker, a seldom busy short function gets no second container."""
    cpu = FixedCpu(saturated=False)
    made, started = launcher(tmp_path, cpu, worker_containers=1 + others)
    seldom_busy(made.queue, containers=1)
    await made.check_launch(None)
    assert len(started) == launched


async def test_a_function_without_containers_gets_one_in_a_full_worker(tmp_path: Path) -> None:
    cpu = FixedCpu(saturated=True)
    made, started = launcher(tmp_path, cpu, worker_containers=20)
    made.queue.asking = 1
    await made.check_launch(None)
    assert cpu.asked == 0 and len(started) == 1


async def test_containers_busy_most_of_the_time_grow_when_the_cpu_allows(
    tmp_path: Path,
) -> None:
    cpu = FixedCpu(saturated=False)
    made, started = launcher(tmp_path, cpu)
    queue = made.queue
    now = asyncio.get_running_loop().time()
    queue.containers[ContainerState.BUSY] = 5
    queue.asking = 2
    queue.held(0.002, now=now - 0.5)
    queue.held(0.002, now=now - 0.21)  # a quiet window ends here
    for _ in range(449):  # then 2 ms calls keep five containers busy 86 % of the time
        queue.held(0.002, now=now - 0.001)
    assert 0.8 < queue.busy_share(now) < 0.9
    await made.check_launch(None)
    assert cpu.asked == 1 and len(started) == 1


async def test_no_growth_checks_when_they_are_turned_off(tmp_path: Path) -> None:
    cpu = FixedCpu(saturated=True)
    made, started = launcher(tmp_path, cpu, hot_grow_spare_mcpus=0)
    seldom_busy(made.queue, containers=5)
    await made.check_launch(None)
    assert cpu.asked == 0 and len(started) == 1
