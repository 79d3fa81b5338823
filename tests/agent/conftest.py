"""Fixtures for the agent core's unit tests: fake driver, small fixed resources."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, Function, frozen_map, new_call_id, utcnow
from config.settings import Settings
from worker.agent.agent import Agent
from worker.agent.cpu import CpuGauge, NeverSaturated
from worker.agent.drivers.fake import FakeBehaviour, FakeDriver
from worker.agent.resources import ResourceTracker
from worker.agent.totals import MIB, ResourceTotals

MEMORY_MB = 1024
CPU_MCPUS = 4000


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "hot_poll_msecs": 10,
        "freeze_idle_msecs": -1,
        "shutdown_grace_msecs": 2000,
        "max_log_size_bytes": 1 << 20,
        "cpu_split": "off",  # this host's load must not move the test process
    }
    values.update(overrides)
    return Settings(_env_file=None, data_dir=data_dir, **values)  # type: ignore[call-arg]


def make_fn(name: str = "hello", **kw: Any) -> Function:
    values: dict[str, Any] = {
        "app": "app",
        "name": name,
        "image": f"img/{name}",
        "memory_mb": 128,
        "timeout_s": 5,
        "idle_timeout_s": 30,
    }
    values.update(kw)
    if "config" in values:
        values["config"] = frozen_map(values["config"])
    return Function(**values)


def make_call(fn: Function, body: bytes = b"in", headers: dict[str, str] | None = None) -> Call:
    return Call(id=new_call_id(), app=fn.app, fn=fn.name, body=body, headers=frozen_map(headers))


def tracker(memory_mb: int = MEMORY_MB, cpu_mcpus: int = CPU_MCPUS) -> ResourceTracker:
    return ResourceTracker(ResourceTotals(memory_bytes=memory_mb * MIB, cpu_mcpus=cpu_mcpus))


AgentFactory = Callable[..., Agent]


class FixedCpu:
    """A CPU gauge with a fixed answer, counting the questions."""

    def __init__(self, saturated: bool) -> None:
        self.answer = saturated
        self.asked = 0

    def touch(self) -> None:
        pass

    def saturated(self, containers: int) -> bool:
        self.asked += 1
        return self.answer


@pytest.fixture
async def agents(settings_env: Path) -> AsyncIterator[AgentFactory]:
    """Make agents on fake drivers; every one is closed (grace 0) at the end."""
    made: list[Agent] = []

    def factory(
        driver: FakeDriver | None = None,
        *,
        memory_mb: int = MEMORY_MB,
        cpu_mcpus: int = CPU_MCPUS,
        cpu: CpuGauge | None = None,
        clock: Callable[[], datetime] = utcnow,
        **settings: Any,
    ) -> Agent:
        agent = Agent(
            make_settings(settings_env / "data", **settings),
            driver or FakeDriver(FakeBehaviour()),
            tracker(memory_mb, cpu_mcpus),
            cpu or NeverSaturated(),  # this host's load must not decide a test
            clock=clock,
        )
        made.append(agent)
        return agent

    yield factory
    for agent in made:
        await agent.close(grace_s=0)
        assert agent.tasks_alive == 0


async def settle(rounds: int = 5) -> None:
    """Let ready callbacks run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
