"""The launcher asks the CPU gauge before it grows a short function whose containers cycle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.agent.conftest import FixedCpu, make_fn, make_settings, tracker
from worker.agent.evictor import Evictor
from worker.agent.launcher import Launcher
from worker.agent.resources import ResourceToken
from worker.agent.slots import Caller, ContainerState, SlotQueue, slot_key


def launcher(tmp_path: Path, cpu: FixedCpu) -> tuple[Launcher, list[ResourceToken]]:
    fn = make_fn()
    queue = SlotQueue(slot_key(fn), fn)
    started: list[ResourceToken] = []
    resources = tracker()

    def start(q: SlotQueue, token: ResourceToken, owner: Caller | None) -> None:
        started.append(token)

    made = Launcher(
        queue,
        settings=make_settings(tmp_path / "data"),
        tracker=resources,
        evictor=Evictor(on_idle_change=resources.lent_changed),
        start_container=start,
        drop_queue=lambda q: False,
        cpu=cpu,
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
