"""The docker driver against the real engine and the real Python FDK."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from config.domain import pid_namespace
from config.errors import ConfigError
from config.settings import Settings
from tests.docker.conftest import request, running, spec
from worker.agent.drivers import docker as docker_driver
from worker.agent.drivers import docker_leftovers
from worker.agent.drivers.claim import claim_name
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import OutputTiming
from worker.agent.errors import (
    ContainerInitFailed,
    ContainerInitTimeout,
    DispatchError,
    FreezeFailed,
    ImageHasVolume,
    ImageNotFound,
)

pytestmark = pytest.mark.integration


async def test_echo_round_trip(driver: DockerDriver) -> None:
    async with running(driver, spec("fnq/echo")) as c:
        result = await c.dispatch(request(b'{"a": 1}', Content_Type="application/json"))
    assert result.status == 200
    assert result.body == b'{"a": 1}'
    assert result.headers["Content-Type"] == "application/json"
    assert result.headers["Fn-Fdk-Version"].startswith("fdk-python/")
    assert not result.truncated


async def test_keep_alive_one_connection(driver: DockerDriver) -> None:
    async with running(driver, spec("fnq/echo")) as c:
        bodies = [(await c.dispatch(request(str(i).encode()))).body for i in range(20)]
        assert c.connections_made == 1
    assert bodies == [str(i).encode() for i in range(20)]


async def test_environment_and_headers_reach_the_function(driver: DockerDriver) -> None:
    s = spec("fnq/env", env={"GREETING": "hi", "FN_LISTENER": "unix:/elsewhere"})
    async with running(driver, s) as c:
        result = await c.dispatch(request())
    env = json.loads(result.body)
    assert env["GREETING"] == "hi"
    assert env["FN_LISTENER"] == "unix:/tmp/iofs/lsnr.sock"  # the driver's contract wins
    assert env["FN_FORMAT"] == "http-stream"
    assert env["FN_APP_NAME"] == "tests" and env["FN_FN_NAME"] == "env"


async def test_pause_and_unpause_seen_by_the_engine(driver: DockerDriver, docker_api: Any) -> None:
    async with running(driver, spec("fnq/echo")) as c:
        await c.pause()
        assert docker_api.inspect_container(c.id)["State"]["Paused"] is True
        await c.unpause()
        assert docker_api.inspect_container(c.id)["State"]["Paused"] is False
        assert (await c.dispatch(request(b"after"))).body == b"after"
        await c.pause()
    # removed while paused
    assert c.id not in [x["Names"][0].lstrip("/") for x in docker_api.containers(all=True)]
    with pytest.raises(FreezeFailed):
        await c.unpause()
    await c.remove()  # again: nothing happens


async def test_limits_and_isolation_in_inspect(driver: DockerDriver, docker_api: Any) -> None:
    s = spec("fnq/echo", memory_mb=64, cpus_mcpu=500, tmpfs_mb=8)
    async with running(driver, s) as c:
        info = docker_api.inspect_container(c.id)
    host = info["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["MemorySwap"] == 64 * 1024 * 1024
    assert host["CpuQuota"] == 50_000 and host["CpuPeriod"] == 100_000
    assert host["PidsLimit"] == driver.settings.max_pids
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Init"] is True
    assert host["Tmpfs"] == {"/tmp": "size=8m"}
    limits = {u["Name"]: u["Soft"] for u in host["Ulimits"]}
    assert limits["nofile"] == driver.settings.max_open_files
    assert info["Config"]["User"] == "1000:1000"
    labels = info["Config"]["Labels"]
    assert labels["fnq.classifier"] == driver.settings.container_label_tag
    assert labels["fnq.instance"] == driver.instance
    assert labels["fnq.app"] == "tests" and labels["fnq.fn"] == "echo"


async def test_no_socket_times_out(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> None:
    quick = DockerDriver(make_settings(hot_start_timeout_msecs=1500))
    await quick.start()
    try:
        c = await quick.create(spec("fnq/nosocket"))
        started = time.monotonic()
        with pytest.raises(ContainerInitTimeout, match=r"lsnr\.sock") as err:
            await c.start()
        assert time.monotonic() - started < 3.0
        assert "not listening on purpose" in str(err.value)  # the last output is quoted
        await c.remove()
    finally:
        await quick.close()


async def test_symlink_out_of_the_directory_is_refused(driver: DockerDriver) -> None:
    c = await driver.create(spec("fnq/badlink"))
    try:
        with pytest.raises(ContainerInitFailed, match="symlink"):
            await c.start()
    finally:
        await c.remove()


async def test_exit_before_ready_is_an_init_failure(
    driver: DockerDriver, docker_engine: Any
) -> None:
    script = "import sys; print('bad start', file=sys.stderr); sys.exit(7)"
    dockerfile = f'FROM fnq/echo:latest\nENTRYPOINT ["/usr/bin/python3", "-c", "{script}"]\n'
    tag = f"fnq/test-badstart:{secrets.token_hex(4)}"
    image, _ = docker_engine.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True
    )
    try:
        c = await driver.create(spec(tag))
        try:
            with pytest.raises(ContainerInitFailed, match="code 7") as err:
                await c.start()
            assert "bad start" in str(err.value)
            assert (await c.wait()).exit_code == 7
        finally:
            await c.remove()
    finally:
        docker_engine.images.remove(image.id, force=True)


async def test_exit_during_a_call(driver: DockerDriver) -> None:
    async with running(driver, spec("fnq/exit")) as c:
        log: list[bytes] = []
        with pytest.raises(DispatchError):
            await c.dispatch(request(b'{"code": 3}'), log.append)
        info = await asyncio.wait_for(c.wait(), 10)
        assert b"exiting with 3" in b"".join(log)
    assert info.exit_code == 3
    assert not info.oom_killed


async def test_an_idle_container_killed_from_outside_is_seen_at_once(
    any_output_driver: DockerDriver, docker_api: Any
) -> None:
    # With markers the driver holds the container's output pipes; were it to keep
    # holding them past the exit, the engine would wait about 2 s for the end of
    # the output before it reported the exit.
    async with running(any_output_driver, spec("fnq/echo")) as c:
        assert c.exact_output
        killed_at = time.monotonic()
        await asyncio.to_thread(docker_api.kill, c.id)
        info = await asyncio.wait_for(c.wait(), 10)
        seen_after_s = time.monotonic() - killed_at
        assert not c.exact_output  # the pipes were let go
    assert info.exit_code == 137
    assert seen_after_s < 1.8, f"exit seen only after {seen_after_s:.2f} s"


async def test_out_of_memory(driver: DockerDriver) -> None:
    async with running(driver, spec("fnq/oom", memory_mb=64)) as c:
        with pytest.raises(DispatchError):
            await c.dispatch(request(b'{"mb": 512}'))
        info = await asyncio.wait_for(c.wait(), 10)
    assert info.oom_killed
    assert "out of memory" in info.describe(64)


async def test_raise_is_a_502_and_the_container_lives_on(driver: DockerDriver) -> None:
    async with running(driver, spec("fnq/raise")) as c:
        log: list[bytes] = []
        first = await c.dispatch(request(), log.append)
        second = await c.dispatch(request(), log.append)
        assert first.output_done is not None and second.output_done is not None
        await asyncio.gather(first.output_done, second.output_done)
    assert first.status == 502 and second.status == 502
    assert b"raised on purpose" in b"".join(log)


async def test_oversized_response_is_truncated(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> None:
    d = DockerDriver(make_settings(max_response_size=1000))
    await d.start()
    try:
        async with running(d, spec("fnq/bytes")) as c:
            big = await c.dispatch(request(b"500000"))
            small = await c.dispatch(request(b"10"))
    finally:
        await d.close()
    assert big.truncated and big.body == b"x" * 1000 and big.status == 200
    assert not small.truncated and small.body == b"x" * 10


async def test_output_goes_to_its_own_call(any_output_driver: DockerDriver) -> None:
    # Each call is dispatched the moment the last one answered, while (with
    # markers) the last one's output may still be on its way: the cut is exact.
    async with running(any_output_driver, spec("fnq/logs")) as c:
        assert c.exact_output  # the tests run as root, next to the engine
        assert c.direct_output is any_output_driver._timing.use_pipes
        for round_ in range(10):
            sinks: dict[str, list[bytes]] = {}
            pending = []
            for tag in ("a", "b", "c"):
                sinks[tag] = []
                body = json.dumps({"lines": 40, "tag": f"{tag}{round_}"}).encode()
                result = await c.dispatch(request(body), sinks[tag].append)
                assert result.body == b"done 40" and result.output_done is not None
                pending.append(result.output_done)
            await asyncio.wait_for(asyncio.gather(*pending), 5)
            for tag, chunks in sinks.items():
                lines = b"".join(chunks).decode().splitlines()
                assert lines == [f"{tag}{round_} line {i}" for i in range(40)]


async def test_output_pipes_take_a_call_whole_the_moment_it_answers(driver: DockerDriver) -> None:
    # Read from pipes of its own, a call's log is complete when dispatch returns:
    # nothing to wait for, and large output (beyond a pipe's 64 KiB) is all there.
    async with running(driver, spec("fnq/logs")) as c:
        assert c.direct_output
        for lines in (1, 6000):
            got: list[bytes] = []
            body = json.dumps({"lines": lines, "tag": f"n{lines}"}).encode()
            result = await c.dispatch(request(body), got.append)
            assert result.output_done is not None and result.output_done.done()
            text = b"".join(got).decode().splitlines()
            assert text == [f"n{lines} line {i}" for i in range(lines)]


async def test_an_image_without_a_shell_keeps_its_command(
    driver: DockerDriver, docker_engine: Any
) -> None:
    dockerfile = 'FROM fnq/logs:latest\nRUN ["/usr/bin/rm", "/usr/bin/sh"]\n'
    tag = f"fnq/test-noshell:{secrets.token_hex(4)}"
    image, _ = docker_engine.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True
    )
    try:
        for _ in range(2):  # the first asks the engine, the second knows
            async with running(driver, spec(tag)) as c:
                assert not c.direct_output and c.exact_output  # markers instead
                got: list[bytes] = []
                result = await c.dispatch(request(b'{"lines": 3, "tag": "s"}'), got.append)
                assert result.output_done is not None
                await asyncio.wait_for(result.output_done, 5)
            assert b"".join(got).decode().splitlines() == [f"s line {i}" for i in range(3)]
    finally:
        docker_engine.images.remove(image.id, force=True)


async def test_output_without_markers_falls_back_to_quiet_time(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> None:
    """Without pipes or markers, a call's output is what comes through the engine until
    it has been quiet a while. The answer comes over the socket and the output through
    the engine, which on a busy host delivers it tens of milliseconds later: the quiet
    time here is one the output arrives within on such a host too (the worker's 2 ms
    is only right on a quiet one, see drivers.output)."""
    timing = OutputTiming(use_pipes=False, use_barrier=False, quiet_s=1.0, limit_s=10.0)
    d = DockerDriver(make_settings(), output_timing=timing)
    await d.start()
    try:
        async with running(d, spec("fnq/logs")) as c:
            assert not c.exact_output
            got: list[bytes] = []
            result = await c.dispatch(request(b'{"lines": 5, "tag": "q"}'), got.append)
            assert result.output_done is not None and result.output_done.done()
    finally:
        await d.close()
    assert b"".join(got).decode().splitlines() == [f"q line {i}" for i in range(5)]


async def test_output_between_calls_goes_to_the_debug_log(
    driver: DockerDriver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fnq.function")
    async with running(driver, spec("fnq/logs")) as c:
        await c.dispatch(request(b'{"lines": 2, "tag": "loose"}'))
    messages = [r.getMessage() for r in caplog.records if r.name == "fnq.function"]
    assert any(m.endswith("loose line 0") for m in messages)
    assert any(m.endswith("loose line 1") for m in messages)


async def test_missing_image_fails_fast(driver: DockerDriver) -> None:
    started = time.monotonic()
    with pytest.raises(ImageNotFound, match="fnq/no-such-function:1"):
        await driver.create(spec("fnq/no-such-function:1"))
    assert time.monotonic() - started < 10.0
    # Concurrent creates of one missing image share one pull and all fail.
    results = await asyncio.gather(
        *(driver.create(spec("fnq/no-such-function:2")) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ImageNotFound) for r in results)
    assert driver.containers == []


async def test_image_with_volume_is_refused(driver: DockerDriver, docker_engine: Any) -> None:
    dockerfile = io.BytesIO(b"FROM fnq/echo:latest\nVOLUME /data\n")
    tag = f"fnq/test-volume:{secrets.token_hex(4)}"
    image, _ = docker_engine.images.build(fileobj=dockerfile, tag=tag, rm=True, forcerm=True)
    try:
        with pytest.raises(ImageHasVolume, match="/data"):
            await driver.create(spec(tag))
    finally:
        docker_engine.images.remove(image.id, force=True)


async def test_leftovers_of_dead_workers_are_removed(
    function_images: list[str], make_settings: Callable[..., Settings], docker_engine: Any
) -> None:
    settings = make_settings()
    finished = subprocess.Popen(["true"])
    finished.wait()
    host = os.uname().nodename

    def stray(**labels: str) -> Any:
        labels["fnq.classifier"] = settings.container_label_tag
        return docker_engine.containers.create("fnq/echo:latest", labels=labels)

    unowned = stray(**{"fnq.instance": "old"})
    dead = stray(**{"fnq.instance": "dead", "fnq.owner": f"{host}:{finished.pid}"})
    live = stray(**{"fnq.instance": "live", "fnq.owner": f"{host}:{os.getpid()}"})
    remote = stray(**{"fnq.instance": "far", "fnq.owner": "elsewhere:1"})
    ours = {"fnq.pidns": pid_namespace()}
    dead_here = stray(**{"fnq.instance": "dead2", "fnq.owner": f"{host}:{finished.pid}", **ours})
    # A worker in a container of its own that shares the host's name: its pid is of
    # another namespace, and does not run here whether or not that worker lives.
    other_ns = stray(**{"fnq.instance": "ns", "fnq.owner": f"{host}:{finished.pid}",
                        "fnq.pidns": "4026531999"})  # fmt: skip
    d = DockerDriver(settings)
    try:
        await d.start()
        names = {n.lstrip("/") for c in docker_engine.api.containers(all=True) for n in c["Names"]}
        assert unowned.name not in names and dead.name not in names
        assert dead_here.name not in names
        assert live.name in names and remote.name in names and other_ns.name in names
    finally:
        await d.close()
        for kept in (live, remote, other_ns):
            kept.remove(force=True)


async def test_two_drivers_sweeping_at_once_remove_each_leftover_once_quietly(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers on one host sweep at the same moment (they were started together):
    the one that finds a container gone or already being removed leaves it to the
    other, with no warning, and the counts add up."""
    settings = make_settings()
    finished = subprocess.Popen(["true"])
    finished.wait()
    labels = {"fnq.classifier": settings.container_label_tag, "fnq.instance": "dead",
              "fnq.owner": f"{os.uname().nodename}:{finished.pid}"}  # fmt: skip
    drivers = [DockerDriver(settings), DockerDriver(settings)]
    try:
        for d in drivers:
            await d.start()
        left = [docker_engine.containers.create("fnq/echo:latest", labels=labels) for _ in range(6)]
        caplog.set_level(logging.INFO, logger="fnq.agent.docker")
        counts = await asyncio.gather(*(d.remove_leftovers() for d in drivers))
        assert sum(counts) == len(left)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        ids = {c["Id"] for c in docker_engine.api.containers(all=True)}
        assert not ids & {c.id for c in left}
    finally:
        for d in drivers:
            await d.close()


async def test_a_leftover_claimed_by_another_sweep_is_left_to_it_until_abandoned(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead worker's container bears its claim name: another worker's sweep is
    removing it, and this sweep leaves it, uncounted. Still there at the next sweep,
    its claim is taken as abandoned (that worker died, or its removal failed), and
    it goes."""
    monkeypatch.setattr(docker_leftovers, "LEFTOVER_SWEEP_S", 3600.0)  # only the sweeps below
    settings = make_settings()
    finished = subprocess.Popen(["true"])
    finished.wait()
    labels = {"fnq.classifier": settings.container_label_tag, "fnq.instance": "dead",
              "fnq.owner": f"{os.uname().nodename}:{finished.pid}"}  # fmt: skip
    d = DockerDriver(settings)
    try:
        await d.start()
        left = docker_engine.containers.create("fnq/echo:latest", labels=labels)
        left.rename(claim_name(left.id))
        caplog.set_level(logging.INFO, logger="fnq.agent.docker")
        assert await d.remove_leftovers() == 0
        assert left.id in {c["Id"] for c in docker_engine.api.containers(all=True)}
        assert await d.remove_leftovers() == 1
        assert left.id not in {c["Id"] for c in docker_engine.api.containers(all=True)}
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        await d.close()


async def test_a_running_driver_removes_what_a_worker_that_dies_meanwhile_left(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_leftovers, "LEFTOVER_SWEEP_S", 0.2)
    settings = make_settings()
    worker = subprocess.Popen(["sleep", "30"])  # stands in for another worker's process
    owner = f"{os.uname().nodename}:{worker.pid}"
    labels = {"fnq.classifier": settings.container_label_tag, "fnq.instance": "other",
              "fnq.owner": owner}  # fmt: skip
    left = docker_engine.containers.create("fnq/echo:latest", labels=labels)
    d = DockerDriver(settings)
    try:
        await d.start()
        await asyncio.sleep(0.6)
        assert left.id in {c["Id"] for c in docker_engine.api.containers(all=True)}  # alive
        worker.kill()
        worker.wait()
        for _ in range(50):
            if left.id not in {c["Id"] for c in docker_engine.api.containers(all=True)}:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the dead worker's container was not removed")
    finally:
        await d.close()
        worker.kill()
        with contextlib.suppress(docker.errors.NotFound):
            left.remove(force=True)


async def test_close_leaves_nothing_behind(
    function_images: list[str], make_settings: Callable[..., Settings], docker_engine: Any
) -> None:
    settings = make_settings()
    d = DockerDriver(settings)
    await d.start()
    base = d.iofs_base
    assert base is not None
    first = await d.create(spec("fnq/echo"))
    await first.start()
    await d.create(spec("fnq/echo"))  # created, never started
    assert len(list(base.iterdir())) == 2
    await d.close()
    label = f"fnq.classifier={settings.container_label_tag}"
    assert docker_engine.containers.list(all=True, filters={"label": label}) == []
    assert not base.exists()
    assert (await first.wait()).exit_code is not None


async def test_closing_many_paused_containers_at_once_leaves_nothing(
    function_images: list[str], make_settings: Callable[..., Settings], docker_engine: Any
) -> None:
    # Each is thawed before it is removed: the engine's own kill-then-thaw of a
    # paused container, many at once, could leave it stuck on one of them.
    settings = make_settings()
    d = DockerDriver(settings)
    await d.start()
    containers = [await d.create(spec("fnq/echo")) for _ in range(6)]
    await asyncio.gather(*(c.start() for c in containers))
    await asyncio.gather(*(c.pause() for c in containers))
    await asyncio.wait_for(d.close(), 60)
    label = f"fnq.classifier={settings.container_label_tag}"
    assert docker_engine.containers.list(all=True, filters={"label": label}) == []
    for c in containers:
        assert (await asyncio.wait_for(c.wait(), 10)).exit_code is not None


@pytest.mark.parametrize("settle_s", [10.0, 0.0], ids=["engine-answers", "engine-slow"])
async def test_a_create_given_up_midway_leaves_no_container(
    driver: DockerDriver, docker_engine: Any, monkeypatch: pytest.MonkeyPatch, settle_s: float
) -> None:
    # The engine goes on making a container after its caller stops waiting. The
    # create gets to end first, and the removal that follows finds the container;
    # a create still unanswered after the wait ("engine-slow": no wait at all)
    # has what it made removed as soon as it answers.
    monkeypatch.setattr("worker.agent.drivers.docker.CREATE_SETTLE_S", settle_s)
    mine = {"label": f"fnq.instance={driver.instance}"}
    await (await driver.create(spec("fnq/echo"))).remove()  # the image's facts now cached
    for delay_ms in (0, 1, 2, 4, 7, 10, 15, 20, 30, 45, 60, 90):
        task = asyncio.ensure_future(driver.create(spec("fnq/echo")))
        await asyncio.sleep(delay_ms / 1000)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await (await task).remove()  # it was made before the cancellation came
        for _ in range(100):  # a late removal takes a moment
            left = docker_engine.api.containers(all=True, filters=mine)  # no inspect each
            if not left or settle_s > 0:
                break
            await asyncio.sleep(0.05)
        assert left == [], delay_ms


async def test_close_removes_a_container_of_its_own_it_lost_track_of(
    function_images: list[str], make_settings: Callable[..., Settings], docker_engine: Any
) -> None:
    settings = make_settings()
    d = DockerDriver(settings)
    await d.start()
    labels = {"fnq.classifier": settings.container_label_tag, "fnq.instance": d.instance,
              "fnq.owner": f"{os.uname().nodename}:{os.getpid()}"}  # fmt: skip
    docker_engine.containers.create("fnq/echo:latest", labels=labels)  # made, never known
    await d.close()
    label = f"fnq.classifier={settings.container_label_tag}"
    assert docker_engine.containers.list(all=True, filters={"label": label}) == []


async def test_load_file_at_start(
    make_settings: Callable[..., Settings], docker_engine: Any, tmp_path: Path
) -> None:
    tag = f"fnq/test-load:{secrets.token_hex(4)}"
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    repo, version = tag.split(":")
    docker_engine.api.import_image_from_data(layer.getvalue(), repository=repo, tag=version)
    archive = tmp_path / "images.tar"
    with archive.open("wb") as out:
        for chunk in docker_engine.images.get(tag).save(named=True):
            out.write(chunk)
    docker_engine.images.remove(tag)
    d = DockerDriver(make_settings(docker_load_file=str(archive)))
    try:
        await d.start()
        assert tag in docker_engine.images.get(tag).tags
    finally:
        await d.close()
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_engine.images.remove(tag, force=True)


async def test_a_slow_engine_does_not_hold_the_start_on_leftovers(
    function_images: list[str],
    make_settings: Callable[..., Settings],
    docker_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Removing a dead worker's containers that the engine takes long to remove
    stops at LEFTOVER_START_S; the worker starts, and the sweeps go on."""
    monkeypatch.setattr(docker_driver, "LEFTOVER_START_S", 0.3)
    settings = make_settings()
    finished = subprocess.Popen(["true"])
    finished.wait()
    labels = {"fnq.classifier": settings.container_label_tag, "fnq.instance": "dead",
              "fnq.owner": f"{os.uname().nodename}:{finished.pid}"}  # fmt: skip
    left = [docker_engine.containers.create("fnq/echo:latest", labels=labels) for _ in range(3)]
    d = DockerDriver(settings)
    real = d.api.request

    async def slow(method: str, path: str, **kw: Any) -> Any:
        if method == "DELETE":
            await asyncio.sleep(10)  # an engine that hangs on removals
        return await real(method, path, **kw)

    monkeypatch.setattr(d.api, "request", slow)
    try:
        t0 = time.monotonic()
        await d.start()
        assert time.monotonic() - t0 < 5
        assert any("took over 0.3 s" in r.getMessage() for r in caplog.records)
    finally:
        monkeypatch.setattr(d.api, "request", real)
        await d.close()
        for c in left:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)


async def test_a_network_the_engine_lacks_fails_the_start(
    make_settings: Callable[..., Settings], docker_engine: Any
) -> None:
    """Every container would fail to start on it: the worker refuses to start instead."""
    present = docker_engine.networks.create(f"fnq-test-{secrets.token_hex(4)}")
    missing = [f"fnq-nosuch-{secrets.token_hex(4)}" for _ in range(2)]
    try:
        d = DockerDriver(make_settings(docker_networks=f"{missing[0]} {present.name} {missing[1]}"))
        try:
            with pytest.raises(ConfigError) as caught:
                await d.start()
        finally:
            await d.close()
        d = DockerDriver(make_settings(docker_networks=present.name))
        try:
            await d.start()  # a network it has is fine
        finally:
            await d.close()
    finally:
        present.remove()
    assert str(caught.value) == (
        f"FN_DOCKER_NETWORKS: the docker engine has no networks {missing[0]}, {missing[1]} "
        "(`docker network ls` lists its networks)"
    )


def test_the_worker_names_a_missing_network_and_does_not_start(
    settings_env: Path, label_tag: str
) -> None:
    env = {**os.environ, "FN_DOCKER_NETWORKS": "fnq-nosuchnet", "FN_CONTAINER_LABEL_TAG": label_tag}
    fnq = Path(sys.executable).parent / "fnq"
    done = subprocess.run([fnq, "worker", "--burst"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert (done.returncode, done.stderr) == (
        1,
        "fnq: FN_DOCKER_NETWORKS: the docker engine has no network fnq-nosuchnet "
        "(`docker network ls` lists its networks)\n",
    )
