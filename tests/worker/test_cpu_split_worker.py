"""A worker with FN_CPU_SPLIT=on: its own CPU, its containers on the others."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from config.domain import CallStatus, Function
from tests.worker.conftest import Cluster, by_status, make_calls
from worker.agent.cpu_place import cpu_list

pytestmark = pytest.mark.integration

ECHO = Function(app="t", name="echo", image="fnq/echo:latest", memory_mb=64)


def allowed(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )


async def test_a_split_worker_runs_apart_from_its_containers(sqlite_cluster: Cluster) -> None:
    host = sorted(os.sched_getaffinity(0))
    sqlite_cluster.env["FN_CPU_SPLIT"] = "on"
    await sqlite_cluster.register(ECHO)
    calls = make_calls("t", "echo", 40)
    await sqlite_cluster.enqueue(calls)
    worker = sqlite_cluster.start_worker()
    done = await sqlite_cluster.wait_final([c.id for c in calls])
    assert by_status(done) == {CallStatus.SUCCESS: 40}
    tag = sqlite_cluster.env["FN_CONTAINER_LABEL_TAG"]
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=fnq.classifier={tag}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    cpusets = subprocess.run(
        ["docker", "inspect", "-f", "{{.HostConfig.CpusetCpus}}", *ids],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split("\n")[: len(ids)]  # fmt: skip
    if len(host) < 2:  # nothing to split
        assert allowed(worker.pid) == cpu_list(host) and set(cpusets) == {""}
        return
    mine = int(allowed(worker.pid))
    assert mine in host
    assert cpusets and set(cpusets) == {cpu_list(set(host) - {mine})}
    assert "the worker runs on CPU" in sqlite_cluster.logs()
