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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config.domain import Call, CallStatus, FailureKind, Function, new_call_id
from config.settings import Settings
from tests.docker.conftest import request, running, spec
from tests.rig import fill_inodes, small_socket_fs
from worker.agent import fdk
from worker.agent.agent import Agent
from worker.agent.drivers import docker_leftovers
from worker.agent.drivers import shortage as shortage_module
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import DockerContainer, OutputTiming
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


FD_DIR = "/proc/self/fd"
SETTLE_S = 5.0


def _is_inotify(fd: str) -> bool:
    try:
        return os.readlink(f"{FD_DIR}/{fd}") == "anon_inode:inotify"
    except OSError:  # closed since it was listed
        return False


async def settled_descriptors() -> int:
    """The descriptors this process has open, counted once the driver has let go of
    what its starts held for a moment: the inotify descriptor that watched for a
    function's socket is closed in a thread after the start (worker.agent.iofs)."""
    async with asyncio.timeout(SETTLE_S):
        while any(_is_inotify(fd) for fd in os.listdir(FD_DIR)):
            await asyncio.sleep(0.01)
    return len(os.listdir(FD_DIR))


def _fill_gaps() -> list[int]:
    """Descriptors (of /dev/null) in every free number below the highest open one."""
    highest = max(int(fd) for fd in os.listdir(FD_DIR))
    fillers: list[int] = []
    try:
        while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < highest:
            fillers.append(fd)
        os.close(fd)
    except BaseException:
        for filler in fillers:
            os.close(filler)
        raise
    return fillers


def open_descriptors() -> dict[int, str]:
    """What each open descriptor of this process is, by its number."""
    described = {}
    for fd in os.listdir(FD_DIR):
        with contextlib.suppress(OSError):  # closed since it was listed
            described[int(fd)] = os.readlink(f"{FD_DIR}/{fd}")
    return described


@contextlib.asynccontextmanager
async def descriptor_limit(limit: Callable[[int], int]) -> AsyncIterator[None]:
    """Set this process's descriptor limit to ``limit(free)``, where ``free`` is the
    lowest free descriptor number once no lower one is free.

    The kernel gives a new descriptor the lowest free number, and refuses one only
    when that number is at the limit. So free numbers below the highest open
    descriptor (left by descriptors closed since it was opened) are filled first,
    once the driver has closed what its starts held for a moment: then the count of
    open descriptors is the lowest free number, and tells what is left below the
    limit, as the driver reads it (drivers.shortage)."""
    await settled_descriptors()
    fillers = _fill_gaps()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        free = len(os.listdir(FD_DIR)) - 1  # less the one that listed them
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit(free), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        for fd in fillers:
            os.close(fd)


def descriptors_left(count: int) -> contextlib.AbstractAsyncContextManager[None]:
    """This process at its descriptor limit but for ``count``, as a worker that has
    opened descriptors up to its limit is."""
    return descriptor_limit(lambda free: free + count)


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
        async with descriptors_left(0):
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
        async with descriptors_left(0):
            with pytest.raises(HostShort, match="starting a container"):
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
    before = open_descriptors()
    container = await driver.create(spec("fnq/echo"))
    await container.start()
    await settled_descriptors()
    lowest = min(fd for fd, what in open_descriptors().items() if before.get(fd) != what)
    await driver.api.close()  # no idle connection to the engine left to reuse
    await driver.api.open()
    # Removing it closes its own descriptors first (pipes, connections): the limit is
    # at the lowest of those, with no number below it free, so none is freed for a
    # connection to the engine.
    async with descriptor_limit(lambda _free: lowest):
        await container.remove()
    assert driver.containers == []
    assert [c.name for c in ours(docker_engine, label_tag)] == [container.id]
    await driver.remove_leftovers()
    assert ours(docker_engine, label_tag) == []


@pytest.mark.parametrize("use_pipes", [True, False], ids=["pipes", "markers"])
async def test_an_idle_container_holds_the_descriptors_the_driver_counts(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    use_pipes: bool,
) -> None:
    """Measured: what idle containers hold in the worker is what the driver counts
    each eviction to give back (HELD_DESCRIPTORS; two fewer with the output through
    the engine), and their removal gives it back at once, but for one more idle
    connection in the session's pool to the engine.

    No sweep for leftovers comes in between: its request to the engine, alongside
    one of the containers', would add a connection to that pool."""
    monkeypatch.setattr(docker_leftovers, "LEFTOVER_SWEEP_S", 3600.0)
    driver = DockerDriver(make_settings(), output_timing=OutputTiming(use_pipes=use_pipes))
    await driver.start()
    count = 3

    async def up() -> DockerContainer:
        container = await driver.create(spec("fnq/echo"))
        await container.start()
        result = await container.dispatch(request(b"x"))
        if result.output_done is not None:
            await result.output_done
        return container

    try:
        first = await up()  # the session's pool and the loop's own descriptors are open
        before = await settled_descriptors()
        containers = [await up() for _ in range(count)]
        held = await settled_descriptors() - before
        expected = HELD_DESCRIPTORS if first.direct_output else HELD_DESCRIPTORS - 2
        assert held == count * expected
        for container in containers:
            await container.remove()
        assert await settled_descriptors() - before <= 1
    finally:
        await driver.close()


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
        async with descriptors_left(0):
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
        async with descriptors_left(3 * HELD_DESCRIPTORS + 16):
            outcomes = await asyncio.gather(
                *(agent.submit(Call(new_call_id(), fn.app, fn.name, b"x"), fn) for fn in fns * 2)
            )
        assert [o.error for o in outcomes if o.status is not CallStatus.SUCCESS] == []
        assert agent.statistics().evictions >= len(fns) - 4
    assert ours(docker_engine, label_tag) == []
    assert not [r for r in caplog.records if "ran out of resources" in r.getMessage()]
