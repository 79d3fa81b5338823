"""A host short of what containers need: no disk room or inode under the socket
directories, no file descriptor left in the worker. Real engine, real tmpfs mounts
(root) and real descriptor limits: the start or the connection fails as the host's
shortage (HostShort: the call goes back to the queue, no attempt counted), never as
the function's fault, and nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, FailureKind, Function, new_call_id
from config.settings import Settings
from tests.docker.conftest import request, running, spec
from tests.rig import fill_inodes, small_socket_fs
from worker.agent import fdk
from worker.agent.agent import Agent
from worker.agent.drivers import shortage as shortage_module
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import DockerContainer
from worker.agent.drivers.shortage import HELD_DESCRIPTORS
from worker.agent.errors import HostShort
from worker.agent.iofs import DIR_INODES
from worker.agent.resources import ResourceTotals, ResourceTracker
from worker.policy import Action, decide

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def ours(docker_engine: Any, label_tag: str) -> list[Any]:
    return list(
        docker_engine.containers.list(all=True, filters={"label": f"fnq.classifier={label_tag}"})
    )


@pytest.fixture
def iofs_fs() -> Iterator[Path]:
    with small_socket_fs() as path:
        yield path


@contextlib.contextmanager
def descriptors_left(count: int) -> Iterator[None]:
    """Lower this process's descriptor limit to what it has open now plus ``count``
    (a negative count: that many must be closed before one can be opened)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one that listed them
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + count, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("keep", [0, 1, 3], ids=["no-dir", "no-pipes", "no-socket"])
async def test_a_socket_directory_without_room_is_the_hosts_shortage(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    iofs_fs: Path,
    docker_engine: Any,
    label_tag: str,
    keep: int,
) -> None:
    """No inode for the directory, for its output pipes, or for the function's socket
    (which the function would fail to make): HostShort before the engine is asked
    for anything; the directory goes; with inodes back, the next start works."""
    driver = DockerDriver(make_settings(iofs_path=str(iofs_fs)))
    await driver.start()
    try:
        fillers = fill_inodes(iofs_fs, keep=keep)
        with pytest.raises(HostShort, match="socket directory") as raised:
            await driver.create(spec("fnq/echo"))
        assert "No space left on device" in str(raised.value) or "no inode left" in str(
            raised.value
        )
        assert [p.name for p in iofs_fs.iterdir() if p.name.startswith("iofs-")] == []
        assert ours(docker_engine, label_tag) == []
        assert driver.shortage.short
        for path in fillers:
            path.unlink()
        async with running(driver, spec("fnq/echo")) as container:
            assert (await container.dispatch(request(b"back"))).body == b"back"
    finally:
        await driver.close()
    assert ours(docker_engine, label_tag) == []


async def test_a_call_without_room_goes_back_uncounted_and_holds_nothing(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    iofs_fs: Path,
    docker_engine: Any,
    label_tag: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through the agent: the call ends not started, as the host's shortage, and the
    worker's policy hands it back without counting an attempt. Its memory is free
    again and no container is left; the log says it once for many calls."""
    settings = make_settings(iofs_path=str(iofs_fs))
    tracker = ResourceTracker(ResourceTotals(memory_bytes=2048 * MIB, cpu_mcpus=2000))
    fn = Function(app="eng", name="echo", image="fnq/echo", memory_mb=64, max_attempts=3)
    fill_inodes(iofs_fs)
    caplog.set_level(logging.WARNING, logger="fnq.agent.docker")
    async with Agent(settings, DockerDriver(settings), tracker=tracker) as agent:
        calls = [Call(id=new_call_id(), app="eng", fn="echo", body=b"x") for _ in range(5)]
        outcomes = await asyncio.gather(*(agent.submit(c, fn) for c in calls))
        for outcome in outcomes:
            assert not outcome.started
            assert outcome.failure is FailureKind.BUSY, outcome
            assert outcome.error is not None and "ran out of resources" in outcome.error
            decision = decide(outcome, fn, 1, random.Random(1))
            assert decision.action is Action.RELEASE and not decision.counted
        stats = agent.statistics()
        assert stats.resources.memory_used_bytes == 0
        assert stats.containers == 0
    assert ours(docker_engine, label_tag) == []
    began = [r for r in caplog.records if "calls that need a new container" in r.getMessage()]
    assert len(began) == 1, [r.getMessage() for r in caplog.records]


async def test_no_descriptor_left_is_the_hosts_shortage(
    driver: DockerDriver,
    docker_engine: Any,
    label_tag: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the worker's descriptor limit a new container is not even asked of the
    engine, and a call that needs a new connection to its container cannot open one:
    both are the host's shortage, and the container serves again once there are
    descriptors."""
    monkeypatch.setattr(shortage_module, "QUIET_S", 0.0)
    monkeypatch.setattr(fdk, "KEEPALIVE_S", 0.0)  # every call opens a new connection
    async with running(driver, spec("fnq/echo")) as container:
        assert (await container.dispatch(request(b"one"))).body == b"one"
        before = {c.id for c in ours(docker_engine, label_tag)}
        with descriptors_left(0):
            with pytest.raises(HostShort, match="file descriptors are in use"):
                await driver.create(spec("fnq/echo"))
            with pytest.raises(HostShort, match="connecting to a function's socket"):
                await container.dispatch(request(b"two"))
        assert {c.id for c in ours(docker_engine, label_tag)} == before
        assert driver.shortage.short
        assert (await container.dispatch(request(b"three"))).body == b"three"
        assert not driver.shortage.short  # a connection was made: the spell is over


async def test_a_start_short_of_descriptors_is_the_hosts_shortage(
    driver: DockerDriver, docker_engine: Any, label_tag: str
) -> None:
    """Descriptors run out between the create and the start (other containers took
    them): the start fails as the host's shortage, not as the function's."""
    container = await driver.create(spec("fnq/echo"))
    try:
        with descriptors_left(0), pytest.raises(HostShort, match="starting a container"):
            await container.start()
    finally:
        await container.remove()
    assert ours(docker_engine, label_tag) == []


async def test_a_container_whose_removal_failed_goes_in_the_next_sweep(
    driver: DockerDriver, docker_engine: Any, label_tag: str
) -> None:
    """With no descriptor to ask the engine with, a container's removal fails and the
    driver lets go of it: the engine still has it (made, or even running). The next
    sweep for leftovers, every few seconds, removes it."""
    container = await driver.create(spec("fnq/echo"))
    await container.start()
    await driver.api.close()  # no idle connection to the engine left to reuse
    await driver.api.open()
    # Removing it closes its own descriptors first (pipes, connections): the limit is
    # below what is open by more than those.
    with descriptors_left(-32):
        await container.remove()
    assert driver.containers == []
    assert [c.name for c in ours(docker_engine, label_tag)] == [container.id]
    await driver.remove_leftovers()
    assert ours(docker_engine, label_tag) == []


async def test_an_idle_container_holds_the_descriptors_the_driver_counts(
    any_output_driver: DockerDriver,
) -> None:
    """Measured: what idle containers hold in the worker is what the driver counts
    each eviction to give back (HELD_DESCRIPTORS; two fewer with the output through
    the engine), and their removal gives it back at once, but for one more idle
    connection in the session's pool to the engine."""
    driver = any_output_driver
    count = 3

    async def up() -> DockerContainer:
        container = await driver.create(spec("fnq/echo"))
        await container.start()
        result = await container.dispatch(request(b"x"))
        if result.output_done is not None:
            await result.output_done
        return container

    first = await up()  # the session's pool and the loop's own descriptors are open
    try:
        before = open_descriptors()
        containers = [await up() for _ in range(count)]
        held = open_descriptors() - before
        expected = HELD_DESCRIPTORS if first.direct_output else HELD_DESCRIPTORS - 2
        assert held == count * expected
        for container in containers:
            await container.remove()
        assert open_descriptors() - before <= 1
    finally:
        await first.remove()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_launch_short_of_inodes_evicts_an_idle_container_of_another_function(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    iofs_fs: Path,
    docker_engine: Any,
    label_tag: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FN_IOFS_PATH has inodes for two socket directories, and two functions' idle
    containers hold them: a third function's call runs in the room of the older one,
    and the host's shortage is never met."""
    settings = make_settings(iofs_path=str(iofs_fs))
    tracker = ResourceTracker(ResourceTotals(memory_bytes=2048 * MIB, cpu_mcpus=2000))
    fns = [
        Function(app="eng", name=name, image="fnq/echo", memory_mb=64, idle_timeout_s=300)
        for name in ("a", "b", "c")
    ]
    fill_inodes(iofs_fs, keep=2 * DIR_INODES)
    caplog.set_level(logging.WARNING, logger="fnq.agent.docker")
    async with Agent(settings, DockerDriver(settings), tracker=tracker) as agent:
        ran = []
        for fn in fns:
            ran.append(await agent.submit(Call(new_call_id(), fn.app, fn.name, b"x"), fn))
            assert ran[-1].status is CallStatus.SUCCESS, ran[-1].error
        alive = {c.name for c in ours(docker_engine, label_tag)}
        assert alive == {ran[1].container_id, ran[2].container_id}
        assert agent.statistics().evictions == 1
    assert ours(docker_engine, label_tag) == []
    assert not [r for r in caplog.records if "ran out of resources" in r.getMessage()]


async def test_a_connection_short_of_descriptors_evicts_an_idle_container_of_another_function(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    label_tag: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker is at its descriptor limit, and a container's kept-alive connection
    has lapsed: the call's new connection takes the room of another function's idle
    container, and the call runs on its own container."""
    monkeypatch.setattr(fdk, "KEEPALIVE_S", 0.0)  # every call opens a new connection
    settings = make_settings()
    tracker = ResourceTracker(ResourceTotals(memory_bytes=2048 * MIB, cpu_mcpus=2000))
    a, b = (
        Function(app="eng", name=name, image="fnq/echo", memory_mb=64, idle_timeout_s=300)
        for name in ("a", "b")
    )
    async with Agent(settings, DockerDriver(settings), tracker=tracker) as agent:
        other = await agent.submit(Call(new_call_id(), a.app, a.name, b"x"), a)
        first = await agent.submit(Call(new_call_id(), b.app, b.name, b"x"), b)
        assert (other.status, first.status) == (CallStatus.SUCCESS, CallStatus.SUCCESS)
        with descriptors_left(0):
            out = await agent.submit(Call(new_call_id(), b.app, b.name, b"y"), b)
        assert out.status is CallStatus.SUCCESS, out.error
        assert out.container_id == first.container_id
        assert agent.statistics().evictions == 1
        assert {c.name for c in ours(docker_engine, label_tag)} == {first.container_id}
    assert ours(docker_engine, label_tag) == []


async def test_a_burst_of_new_functions_at_the_descriptor_limit_runs_every_call(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    label_tag: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker has descriptors for about three more containers, and calls of twelve
    functions come at once: launches count the containers starting beside them, so
    they do not all start on the same free room. Those that find none wait for the
    starts under way, then take the room of idle containers: every call runs, none
    goes back as the host's shortage."""
    settings = make_settings()
    tracker = ResourceTracker(ResourceTotals(memory_bytes=4096 * MIB, cpu_mcpus=2000))
    fns = [
        Function(app="eng", name=f"f{i:02}", image="fnq/echo", memory_mb=32, idle_timeout_s=300)
        for i in range(12)
    ]
    caplog.set_level(logging.WARNING, logger="fnq.agent.docker")
    async with Agent(settings, DockerDriver(settings), tracker=tracker) as agent:
        first = await agent.submit(Call(new_call_id(), "eng", "f00", b"x"), fns[0])
        assert first.status is CallStatus.SUCCESS, first.error
        with descriptors_left(3 * HELD_DESCRIPTORS + 16):
            outcomes = await asyncio.gather(
                *(agent.submit(Call(new_call_id(), fn.app, fn.name, b"x"), fn) for fn in fns * 2)
            )
        assert [o.error for o in outcomes if o.status is not CallStatus.SUCCESS] == []
        assert agent.statistics().evictions >= len(fns) - 4
    assert ours(docker_engine, label_tag) == []
    assert not [r for r in caplog.records if "ran out of resources" in r.getMessage()]
