"""Functions that break the contract (tests/functions/misbehave) on the real engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.docker.conftest import request, spec
from worker.agent.driver import ContainerSpec, DispatchRequest
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import DockerContainer
from worker.agent.errors import DispatchError

pytestmark = pytest.mark.integration
IMAGE = "fnq/misbehave"


def do(what: str, timeout_s: float = 30.0, **args: Any) -> DispatchRequest:
    return request(json.dumps({"do": what, **args}).encode(), timeout_s=timeout_s)


@asynccontextmanager
async def running(driver: DockerDriver, s: ContainerSpec) -> AsyncIterator[DockerContainer]:
    container = await driver.create(s)
    try:
        await container.start()
        yield container
    finally:
        await container.remove()


async def test_the_last_words_of_a_dying_function_are_in_its_calls_log(
    any_output_driver: DockerDriver,
) -> None:
    # The process closes its connection (a finally block) before the traceback
    # says why it dies: the call's log must not end at the broken connection.
    for _ in range(3):
        async with running(any_output_driver, spec(IMAGE)) as c:
            log: list[bytes] = []
            with pytest.raises(DispatchError):
                await c.dispatch(do("die"), log.append)
            assert b"RuntimeError: the function's last words" in b"".join(log)
