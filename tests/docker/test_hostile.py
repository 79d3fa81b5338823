"""What a hostile function (tests/functions/misbehave, hostile.py) may do, on the real engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.docker.conftest import request, running, spec
from worker.agent.drivers.docker import DockerDriver

pytestmark = pytest.mark.integration
IMAGE = "fnq/misbehave"


def do(what: str, **args: Any) -> Any:
    return request(json.dumps({"do": what, **args}).encode(), timeout_s=10.0)


async def test_a_function_runs_unprivileged_read_only_offline_and_limited(
    driver: DockerDriver,
) -> None:
    settings = driver.settings
    async with running(driver, spec(IMAGE, memory_mb=64, tmpfs_mb=8)) as c:
        result = await c.dispatch(do("probe"))
        assert result.status == 200, result.body
        seen = json.loads(result.body)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (1000, 1000, [1000])
    status = seen["status"]
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0" * 16
    assert status["NoNewPrivs"] == "1"
    assert not seen["root_writable"]
    assert seen["tmp_bytes"] == 8 * 1024 * 1024
    assert seen["net"] == ["lo"]
    assert seen["pid1"] == "/sbin/docker-init"
    assert seen["mem"] == seen["memsw"] == str(64 * 1024 * 1024)  # no swap on top
    assert seen["pids"] == str(settings.max_pids)
    assert seen["limits"]["nofile"] == settings.max_open_files
    assert seen["limits"]["memlock"] == settings.max_locked_memory
    assert seen["limits"]["sigpending"] == settings.max_pending_signals
    assert seen["limits"]["msgqueue"] == settings.max_message_queue


async def test_output_pipes_relinked_by_the_function_lead_nowhere_on_the_host(
    driver: DockerDriver, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    async with running(driver, spec(IMAGE)) as c:
        assert c.direct_output
        relinked = await c.dispatch(do("relink_pipes", target=str(victim)))
        assert relinked.status == 200
        assert (c.iofs.host_path / ".fnq-stdout").is_symlink()
        for _ in range(2):  # the worker keeps the pipes it opened before the start
            assert (await c.dispatch(do("probe"))).status == 200
        directory = c.iofs.host_path
    assert not directory.exists()  # the links were removed, not followed
    assert victim.read_text() == "precious\n"
