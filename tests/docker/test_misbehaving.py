"""Functions that break the contract (tests/functions/misbehave) on the real engine."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.domain import CallStatus, FailureKind
from tests.docker.conftest import request, running, spec
from tests.docker.test_agent_engine import agent_for, call, fn, ours, wait_for
from worker.agent.agent import Agent
from worker.agent.driver import DispatchRequest
from worker.agent.drivers.docker import DockerDriver
from worker.agent.errors import DispatchError, ExchangeBroken, NotDelivered
from worker.agent.iofs import remove_tree

pytestmark = pytest.mark.integration
__all__ = ["agent_for"]  # the fixture, shared with test_agent_engine
IMAGE = "fnq/misbehave"


def do(what: str, timeout_s: float = 30.0, **args: Any) -> DispatchRequest:
    return request(json.dumps({"do": what, **args}).encode(), timeout_s=timeout_s)


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


async def test_a_function_that_hangs_up_and_lives_on_fails_its_call_at_once(
    agent_for: Callable[..., Agent], any_output_driver: DockerDriver
) -> None:
    # The process closes the connection without an answer and goes on: no exit is
    # coming, and the call fails as soon as the driver has seen the process live on
    # (a dying one is gone within tens of milliseconds: see the test above).
    async with running(any_output_driver, spec(IMAGE)) as c:
        assert (await c.dispatch(do("ok"))).status == 200
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(ExchangeBroken) as caught:
            await c.dispatch(do("hang_up"))
        assert loop.time() - began < 0.3
        assert caught.value.exited is False
    hangs_up = fn("hangs-up", IMAGE)
    async with agent_for() as agent:
        first = await agent.submit(call(hangs_up, b'{"do": "ok"}'), hangs_up)
        assert first.status is CallStatus.SUCCESS, first.error
        began = loop.time()
        out = await agent.submit(call(hangs_up, b'{"do": "hang_up"}'), hangs_up)
        took = loop.time() - began
        assert (out.status, out.failure) == (CallStatus.ERROR, FailureKind.FUNCTION)
        assert out.error == (
            "error receiving the function's response: the connection closed without a response"
        )
        assert took < 0.4, took
        again = await agent.submit(call(hangs_up, b'{"do": "ok"}'), hangs_up)
        assert again.status is CallStatus.SUCCESS, again.error
        assert again.container_id != first.container_id  # the one that hung up is retired


async def test_a_function_that_closes_its_listener_and_lives_on_fails_its_call_at_once(
    agent_for: Callable[..., Agent], any_output_driver: DockerDriver
) -> None:
    # Its socket refuses the connection while the process lives on: the driver's
    # watch of the process says so with the refusal, and no exit is waited for.
    async with running(any_output_driver, spec(IMAGE)) as c:
        assert (await c.dispatch(do("close_listener"))).status == 200
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(NotDelivered) as caught:
            await c.dispatch(do("ok"))
        assert loop.time() - began < 0.3
        assert caught.value.exited is False
    closes = fn("closes-listener", IMAGE)
    async with agent_for() as agent:
        first = await agent.submit(call(closes, b'{"do": "close_listener"}'), closes)
        assert first.status is CallStatus.SUCCESS, first.error
        began = loop.time()
        out = await agent.submit(call(closes, b'{"do": "ok"}'), closes)
        took = loop.time() - began
        assert (out.status, out.failure) == (CallStatus.ERROR, FailureKind.FUNCTION)
        assert out.error is not None
        assert out.error.startswith("the function's socket took no connection: "), out.error
        assert "Connection refused" in out.error, out.error
        assert took < 0.4, took
        again = await agent.submit(call(closes, b'{"do": "ok"}'), closes)
        assert again.status is CallStatus.SUCCESS, again.error
        assert again.container_id != first.container_id  # the refusing one is retired


async def test_a_refusal_by_a_container_that_exited_says_it_is_gone(
    any_output_driver: DockerDriver,
) -> None:
    async with running(any_output_driver, spec(IMAGE)) as c:
        assert (await c.dispatch(do("exit_after"))).status == 200
        async with asyncio.timeout(10):
            await c.wait()
        with pytest.raises(NotDelivered) as caught:
            await c.dispatch(do("ok"))
        assert caught.value.exited is True


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("stop_accepting", "the connection waited in the function's listener backlog"),
        ("jam", "the function's listener backlog stayed full"),
    ],
)
async def test_a_call_the_function_never_accepts_fails_unstarted_and_its_container_goes(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str, mode: str, why: str
) -> None:
    # The function answers one call, then takes no connection any more: the next call
    # waits for it until its timeout, and never reaches it. Not a run of the function,
    # so not its timeout: the call comes back unstarted, failed by the function (as by
    # a container that never starts), and the stuck container goes; the call after it
    # gets a new one.
    stuck = fn("stuck", IMAGE, timeout_s=1)
    async with agent_for() as agent:
        first = await agent.submit(call(stuck, json.dumps({"do": mode}).encode()), stuck)
        assert first.status is CallStatus.SUCCESS, first.error
        out = await agent.submit(call(stuck, b'{"do": "ok"}'), stuck)
        assert (out.status, out.failure, out.started) == (
            CallStatus.ERROR,
            FailureKind.FUNCTION,
            False,
        )
        assert out.error == (
            f"container {first.container_id} of {stuck.ref} did not accept the call within "
            f"1 s ({why}); the call did not reach the function"
        )
        await wait_for(
            lambda: first.container_id not in {c.name for c in ours(docker_engine, label_tag)}
        )
        again = await agent.submit(call(stuck, b'{"do": "ok"}'), stuck)
        assert again.status is CallStatus.SUCCESS, again.error
        assert again.container_id != first.container_id


async def test_a_socket_directory_of_any_depth_is_removed_with_its_container(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    deep = fn("deep", IMAGE, idle_timeout_s=1)
    # Socket paths must fit in 107 bytes, so not under pytest's long tmp_path.
    iofs = Path(tempfile.mkdtemp(prefix="fnq-t-", dir="/tmp"))
    try:
        async with agent_for(iofs_path=str(iofs)) as agent:
            out = await agent.submit(call(deep, b'{"do": "deep_dir", "depth": 3000}'), deep)
            assert out.status is CallStatus.SUCCESS, out.error
            # Its idle timeout retires it: the container, its directory and its
            # memory must all go (a removal that failed kept the memory for good).
            await wait_for(lambda: agent.tracker.statistics().memory_used_bytes == 0)
            assert ours(docker_engine, label_tag) == []
            assert list(iofs.iterdir()) == []
    finally:
        remove_tree(iofs)
