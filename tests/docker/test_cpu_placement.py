"""Containers placed on CPUs by the docker driver (FN_CPU_SPLIT), on the real engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.docker.conftest import request, spec
from worker.agent.cpu_place import online_cpus
from worker.agent.drivers.docker import DockerDriver

pytestmark = pytest.mark.integration


def allowed_cpus(docker_api: Any, container_id: str) -> str:
    """The CPUs the container's first process may run on, as the kernel lists them."""
    pid = docker_api.inspect_container(container_id)["State"]["Pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )


async def test_live_and_new_containers_go_where_they_are_placed(
    driver: DockerDriver, docker_api: Any
) -> None:
    paused, running = await driver.create(spec("fnq/echo")), await driver.create(spec("fnq/echo"))
    await paused.start()
    await running.start()
    await paused.pause()
    await driver.place(frozenset({0}))
    for c in (paused, running):
        assert docker_api.inspect_container(c.id)["HostConfig"]["CpusetCpus"] == "0"
        assert allowed_cpus(docker_api, c.id) == "0"
    later = await driver.create(spec("fnq/echo"))
    await later.start()
    assert docker_api.inspect_container(later.id)["HostConfig"]["CpusetCpus"] == "0"
    await paused.unpause()
    for c in (paused, running, later):
        assert (await c.dispatch(request(b"placed"))).body == b"placed"

    await driver.place(None)  # back on every CPU of the host
    everywhere = online_cpus()
    for c in (paused, running, later):
        assert docker_api.inspect_container(c.id)["HostConfig"]["CpusetCpus"] == everywhere
        assert allowed_cpus(docker_api, c.id) == everywhere
    last = await driver.create(spec("fnq/echo"))
    assert docker_api.inspect_container(last.id)["HostConfig"]["CpusetCpus"] == ""
    await last.remove()


async def test_a_container_that_went_away_is_skipped(driver: DockerDriver, docker_api: Any) -> None:
    gone, kept = await driver.create(spec("fnq/echo")), await driver.create(spec("fnq/echo"))
    await kept.start()
    docker_api.remove_container(gone.id, force=True)  # from outside: the driver still lists it
    cpu = max(os.sched_getaffinity(0))
    await driver.place(frozenset({cpu}))
    assert docker_api.inspect_container(kept.id)["HostConfig"]["CpusetCpus"] == str(cpu)
