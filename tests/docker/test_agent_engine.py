"""The agent core on the real docker engine with the FDK test images."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings
from worker.agent.agent import Agent
from worker.agent.drivers.docker import DockerDriver
from worker.agent.resources import ResourceTracker
from worker.agent.totals import ResourceTotals
from worker.images import ImageBuilder, find_functions

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def fn(name: str, image: str, **kw: Any) -> Function:
    return Function(app="eng", name=name, image=image, **{"memory_mb": 64, **kw})


def call(f: Function, body: bytes = b"x") -> Call:
    return Call(id=new_call_id(), app=f.app, fn=f.name, body=body)


def ours(docker_engine: Any, label_tag: str) -> list[Any]:
    return list(
        docker_engine.containers.list(all=True, filters={"label": f"fnq.classifier={label_tag}"})
    )


async def wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.05)


@pytest.fixture
def agent_for(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> Callable[..., Agent]:
    def make(memory_mb: int = 2048, **overrides: Any) -> Agent:
        settings = make_settings(**overrides)
        tracker = ResourceTracker(ResourceTotals(memory_bytes=memory_mb * MIB, cpu_mcpus=2000))
        return Agent(settings, DockerDriver(settings), tracker=tracker)

    return make


async def test_100_sequential_calls_use_one_container(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    echo = fn("echo", "fnq/echo:latest")
    async with agent_for() as agent:
        for i in range(100):
            out = await agent.submit(call(echo, f"n{i}".encode()), echo)
            assert out.status is CallStatus.SUCCESS, out.error
            assert out.response is not None and out.response.body == f"n{i}".encode()
        stats = agent.statistics().queue("eng/echo")
        assert stats is not None and stats.containers_started == 1
        assert len(ours(docker_engine, label_tag)) == 1
    assert ours(docker_engine, label_tag) == []  # nothing left after close


async def test_parallel_calls_use_between_2_and_n_containers(
    agent_for: Callable[..., Agent],
) -> None:
    sleep = fn("sleep", "fnq/sleep:latest", timeout_s=20)
    async with agent_for() as agent:
        outs = await asyncio.gather(*(agent.submit(call(sleep, b"1"), sleep) for _ in range(4)))
        assert all(o.status is CallStatus.SUCCESS for o in outs), [o.error for o in outs]
        stats = agent.statistics().queue("eng/sleep")
        assert stats is not None and stats.containers_started <= 4
        # A container whose start outlasts a call (a busy host) may find every call
        # served by one that was free again: it was started, and serves none.
        assert 2 <= len({o.container_id for o in outs}) <= stats.containers_started


def is_paused(container: Any) -> bool:
    container.reload()
    return bool(container.attrs["State"]["Paused"])


async def test_idle_container_is_paused_then_unpaused_for_the_next_call(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    echo = fn("echo", "fnq/echo:latest")
    async with agent_for(freeze_idle_msecs=0) as agent:
        first = await agent.submit(call(echo), echo)
        (container,) = ours(docker_engine, label_tag)
        await wait_for(lambda: is_paused(container))
        second = await agent.submit(call(echo, b"again"), echo)
        assert second.status is CallStatus.SUCCESS
        assert second.container_id == first.container_id


async def test_a_container_paused_or_unpaused_from_outside_stays_in_service(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    echo = fn("echo", "fnq/echo:latest")
    async with agent_for(freeze_idle_msecs=0) as agent:
        first = await agent.submit(call(echo), echo)
        (container,) = ours(docker_engine, label_tag)
        await wait_for(lambda: is_paused(container))
        container.unpause()  # an operator's, behind the agent's back
        second = await agent.submit(call(echo, b"two"), echo)
        assert second.status is CallStatus.SUCCESS, second.error
        assert second.container_id == first.container_id
        await wait_for(lambda: is_paused(container))
        container.unpause()
        container.pause()  # and paused again before the agent pauses it
        third = await agent.submit(call(echo, b"three"), echo)
        assert third.status is CallStatus.SUCCESS, third.error
        assert third.container_id == first.container_id
        assert agent.statistics().queue("eng/echo").containers_started == 1  # type: ignore[union-attr]


async def test_idle_timeout_removes_the_container_and_frees_its_tokens(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    echo = fn("echo", "fnq/echo:latest", idle_timeout_s=1)
    async with agent_for() as agent:
        assert (await agent.submit(call(echo), echo)).status is CallStatus.SUCCESS
        assert agent.tracker.statistics().memory_used_bytes == 64 * MIB
        await wait_for(lambda: agent.tracker.statistics().memory_used_bytes == 0)
        await wait_for(lambda: ours(docker_engine, label_tag) == [])


async def test_idle_container_of_another_function_is_evicted_for_room(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    first = fn("first", "fnq/echo:latest", memory_mb=64)
    second = fn("second", "fnq/echo:latest", memory_mb=64)
    async with agent_for(memory_mb=100, hot_poll_msecs=50) as agent:  # room for one
        a = await agent.submit(call(first), first)
        b = await agent.submit(call(second), second)
        assert (a.status, b.status) == (CallStatus.SUCCESS, CallStatus.SUCCESS), b.error
        assert a.container_id != b.container_id
        assert agent.statistics().evictions == 1
        await wait_for(lambda: len(ours(docker_engine, label_tag)) == 1)


async def test_a_function_without_a_container_gets_room_that_busy_functions_hold(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str
) -> None:
    """Room for two containers, two functions that always have calls waiting: a third
    function's call still runs, and none of theirs fails."""
    busy = [fn(name, "fnq/sleep:latest") for name in ("a", "b")]
    echo = fn("c", "fnq/echo:latest", timeout_s=8)  # displacing after 2 s (25 %)
    outcomes: list[Any] = []
    ran_by: dict[str, int] = {f.name: 0 for f in busy}  # calls each function has run
    stop = asyncio.Event()

    async def keep_busy(f: Function) -> None:
        while not stop.is_set():
            outcomes.append(await agent.submit(call(f, b"0.2"), f))
            ran_by[f.name] += 1

    def each_ran(since: dict[str, int], calls: int) -> bool:
        return all(ran_by[name] >= since[name] + calls for name in since)

    async with agent_for(memory_mb=128, hot_displace_wait_percent=25) as agent:
        loops = [asyncio.create_task(keep_busy(f)) for f in busy for _ in range(2)]
        try:
            none = dict.fromkeys(ran_by, 0)
            await wait_for(lambda: each_ran(none, 4))  # both run, their calls queue up
            assert len(ours(docker_engine, label_tag)) == 2
            loop = asyncio.get_running_loop()
            began = loop.time()
            out = await agent.submit(call(echo, b"through"), echo)
            waited = loop.time() - began
            assert out.status is CallStatus.SUCCESS, out.error
            assert out.response is not None and out.response.body == b"through"
            assert 2.0 <= waited < 8.0, waited
            assert agent.statistics().displacements == 1
            ran = dict(ran_by)  # the function that gave up its container runs again
            await wait_for(lambda: each_ran(ran, 2))
            # one container each, and one more for the function that gave its up
            # (counted before the calls stop: then one's idle container may go to the other)
            assert len({o.container_id for o in outcomes}) == 3
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*loops), 30)
    assert [o.error for o in outcomes if o.status is not CallStatus.SUCCESS] == []
    assert ours(docker_engine, label_tag) == []


async def test_a_call_that_can_never_fit_is_rejected_at_once(
    agent_for: Callable[..., Agent],
) -> None:
    huge = fn("huge", "fnq/echo:latest", memory_mb=4096)
    async with agent_for(memory_mb=1024) as agent:
        out = await asyncio.wait_for(agent.submit(call(huge), huge), timeout=5)
        assert out.status is CallStatus.ERROR and out.failure is not None
        assert out.failure.value == "terminal" and out.error


async def test_no_socket_directory_left_after_close(agent_for: Callable[..., Agent]) -> None:
    echo = fn("echo", "fnq/echo:latest")
    # Socket paths must fit in 107 bytes, so not under pytest's long tmp_path.
    iofs = Path(tempfile.mkdtemp(prefix="fnq-t-", dir="/tmp"))
    async with agent_for(iofs_path=str(iofs)) as agent:
        await agent.submit(call(echo), echo)
        assert any(iofs.rglob("*"))
    assert list(iofs.rglob("lsnr.sock")) == []
    assert [p for p in iofs.iterdir() if p.is_dir() and any(p.iterdir())] == []
    shutil.rmtree(iofs)


async def test_a_call_reports_its_cpu_time_and_memory(agent_for: Callable[..., Agent]) -> None:
    hog = fn("hog", "fnq/oom:latest", memory_mb=128)
    async with agent_for() as agent:
        small = await agent.submit(call(hog, b"0"), hog)
        big = await agent.submit(call(hog, b"48"), hog)  # allocates and touches 48 MB
    assert small.status is CallStatus.SUCCESS and big.status is CallStatus.SUCCESS, big.error
    assert set(big.stats) >= {"cpu_ms", "memory_mb"}
    # The kernel adds CPU time to a cgroup when the process leaves the CPU: a call of
    # well under a millisecond may read 0 (docs/datastore.md); 48 MB cannot.
    assert big.stats["cpu_ms"] > small.stats["cpu_ms"] >= 0
    assert 0 < big.stats["memory_mb"] < 128
    if "memory_peak_mb" in big.stats:  # cgroup v1 keeps a high-water mark
        assert big.stats["memory_peak_mb"] >= 48 > small.stats["memory_peak_mb"]


async def test_a_call_that_ends_without_an_answer_reports_its_use(
    agent_for: Callable[..., Agent],
) -> None:
    hog = fn("hog", "fnq/oom:latest", memory_mb=64)
    slow = fn("slow", "fnq/sleep:latest", timeout_s=1)
    async with agent_for() as agent:
        oom = await agent.submit(call(hog, b"256"), hog)  # killed at its 64 MB
        late = await agent.submit(call(slow, b"5"), slow)
    assert oom.status is CallStatus.ERROR and "out of memory" in (oom.error or ""), oom.error
    assert oom.stats.get("cpu_ms", 0) > 0, oom.stats
    if "memory_peak_mb" in oom.stats:  # cgroup v1 keeps a high-water mark
        assert oom.stats["memory_peak_mb"] >= 56, oom.stats
    assert late.status is CallStatus.TIMEOUT, late.error
    assert set(late.stats) >= {"cpu_ms", "memory_mb"}, late.stats


async def test_calls_of_a_function_that_never_opens_its_socket_end_after_one_start(
    agent_for: Callable[..., Agent],
) -> None:
    # One start turn: without the shared failure, the six calls would end one
    # start timeout after another.
    broken = fn("broken", "fnq/nosocket:latest")
    async with agent_for(hot_start_timeout_msecs=1000, hot_start_concurrency=1) as agent:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcomes = await asyncio.gather(*(agent.submit(call(broken), broken) for _ in range(6)))
        elapsed = loop.time() - t0
    assert {o.status for o in outcomes} == {CallStatus.ERROR}
    assert all(o.error is not None and "did not create lsnr.sock" in o.error for o in outcomes)
    assert elapsed < 4.0, elapsed  # one start timeout of 1 s, not six


async def test_calls_after_a_rebuild_under_the_same_tag_run_the_new_image(
    agent_for: Callable[..., Agent], docker_engine: Any, label_tag: str, tmp_path: Path
) -> None:
    """``fnq images build`` of changed code, while containers of the old build are hot."""
    name = f"fnqtest-rebuilt-{secrets.token_hex(4)}"
    source = tmp_path / name
    source.mkdir()

    def build(answer: str) -> str:
        source.joinpath("func.py").write_text(
            f"def handler(ctx, data=None):\n    return {answer!r}\n"
        )
        with ImageBuilder(client=docker_engine) as builder:
            return builder.build(find_functions([source]))[-1].image

    image = await asyncio.to_thread(build, "v1")
    old_id = docker_engine.images.get(image).id
    try:
        f = fn("rebuilt", image, idle_timeout_s=600)
        async with agent_for(freeze_idle_msecs=0) as agent:
            first = await agent.submit(call(f), f)
            assert first.response is not None and first.response.body == b"v1"
            await asyncio.to_thread(build, "v2")

            async def answer() -> bytes:
                out = await agent.submit(call(f), f)
                assert out.response is not None, out.error
                return out.response.body

            async with asyncio.timeout(10):
                while await answer() != b"v2":
                    await asyncio.sleep(0.2)
            assert await answer() == b"v2"
            await wait_for(lambda: len(ours(docker_engine, label_tag)) == 1)
    finally:
        for ref in (image, old_id):
            with contextlib.suppress(Exception):
                docker_engine.images.remove(ref, force=True)
