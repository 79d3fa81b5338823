"""A worker on a host short of what containers need, end to end: a real `fnq worker`
process, real engine, SQLite queue and datastore. Calls that cannot get a container
for want of file descriptors or of room for their socket directories go back to
the queue, uncounted, and all of them run once the host has room: none fails, the
worker keeps going, nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from config.domain import CallStatus, Function
from config.settings import sqlite_url
from datastore.base import open_datastore
from mq.base import open_queue
from tests.rig import fill_inodes, fill_space, small_socket_fs, small_tmpfs
from tests.worker.conftest import Cluster, make_calls
from worker.agent.drivers.docker_config import FN_LABEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def echo(name: str, idle_timeout_s: int = 1, image: str = "fnq/echo:latest") -> Function:
    return Function(app="t", name=name, image=image, memory_mb=32, timeout_s=20,
                    idle_timeout_s=idle_timeout_s, max_attempts=2,
                    retry_backoff_s=0.2)  # fmt: skip


def containers_of(cluster: Cluster, docker_engine: Any) -> list[Any]:
    tag = cluster.env["FN_CONTAINER_LABEL_TAG"]
    return list(docker_engine.containers.list(all=True, filters={"label": f"fnq.classifier={tag}"}))


async def test_a_worker_short_of_descriptors_runs_every_call(
    sqlite_cluster: Cluster, docker_engine: Any
) -> None:
    """`ulimit -n 64` and calls of eight functions at once, each holding its container
    for 0.5 s: room for two or three containers at a time, all of them busy, so none
    can make way for another function. Calls wait in the queue for the others to
    leave; each runs once, its attempt counted once."""
    fns = [echo(f"e{i}", image="fnq/sleep:latest") for i in range(8)]
    calls = []
    for fn in fns:
        await sqlite_cluster.register(fn)
        calls += make_calls("t", fn.name, 3, body=b"0.5")
    await sqlite_cluster.enqueue(calls)
    worker = sqlite_cluster.start_worker("--prefetch", "16", open_files=(64, 64))
    done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=180)
    logs = sqlite_cluster.logs()
    assert {rec.status for rec in done.values()} == {CallStatus.SUCCESS}, logs[-3000:]
    assert {rec.attempts for rec in done.values()} == {1}
    assert worker.poll() is None
    assert "file descriptors are in use (ulimit -n)" in logs
    assert "Traceback" not in logs
    sqlite_cluster.stop_all(signal.SIGTERM)
    assert worker.returncode == 0
    assert containers_of(sqlite_cluster, docker_engine) == []


async def test_idle_containers_of_other_functions_make_way_for_new_ones(
    sqlite_cluster: Cluster, docker_engine: Any
) -> None:
    """`ulimit -n 96` has room for about six containers (ten descriptors each). Twelve
    functions are called one after another, their idle containers meant to stay for
    5 min: once the worker is short of descriptors, each new function's launch
    evicts the oldest idle containers and its call runs within seconds; none goes
    back to the queue for want of descriptors."""
    fns = [echo(f"f{i:02}", idle_timeout_s=300) for i in range(12)]
    worker = sqlite_cluster.start_worker(open_files=(96, 96))
    took_s = []
    for fn in fns:
        await sqlite_cluster.register(fn)
        calls = make_calls("t", fn.name, 1)
        began = time.monotonic()
        await sqlite_cluster.enqueue(calls)
        done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=30)
        took_s.append(time.monotonic() - began)
        assert {(rec.status, rec.attempts) for rec in done.values()} == {(CallStatus.SUCCESS, 1)}
    logs = sqlite_cluster.logs()
    assert max(took_s) < 10, (took_s, logs[-3000:])
    assert "calls that need a new container or connection go back" not in logs, logs[-3000:]
    alive = sorted(c.labels[FN_LABEL] for c in containers_of(sqlite_cluster, docker_engine))
    assert 0 < len(alive) < len(fns) - 2, alive  # some made way, for want of descriptors
    assert alive == [fn.name for fn in fns[-len(alive) :]]  # the oldest first
    assert worker.poll() is None
    assert "Traceback" not in logs
    sqlite_cluster.stop_all(signal.SIGTERM)
    assert worker.returncode == 0
    assert containers_of(sqlite_cluster, docker_engine) == []


@pytest.fixture
def socket_fs() -> Iterator[Path]:
    with small_socket_fs() as path:
        yield path


async def test_calls_wait_in_the_queue_while_the_socket_directories_are_full(
    sqlite_cluster: Cluster, socket_fs: Path, docker_engine: Any
) -> None:
    """FN_IOFS_PATH has no inode left: the calls go back to the queue, their records
    `queued` with the reason, no attempt counted; once there is room they run."""
    await sqlite_cluster.register(echo("e"))
    calls = make_calls("t", "e", 3)
    await sqlite_cluster.enqueue(calls)
    fillers = fill_inodes(socket_fs)
    sqlite_cluster.env["FN_IOFS_PATH"] = str(socket_fs)
    worker = sqlite_cluster.start_worker()
    store = await open_datastore(sqlite_cluster.settings)
    try:
        await store_says(store, calls[0].id, "socket directory")
        rec = await store.get_call(calls[0].id)
        assert rec is not None and rec.status is CallStatus.QUEUED and rec.attempts == 0
        assert rec.error is not None and "No space left on device" in rec.error
    finally:
        await store.close()
    for path in fillers:
        path.unlink()
    done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=60)
    assert {(rec.status, rec.attempts) for rec in done.values()} == {(CallStatus.SUCCESS, 1)}
    logs = sqlite_cluster.logs()
    assert logs.count("calls that need a new container or connection go back") == 1, logs
    assert "Traceback" not in logs
    sqlite_cluster.stop_all(signal.SIGTERM)
    assert worker.returncode == 0
    assert containers_of(sqlite_cluster, docker_engine) == []
    assert list(socket_fs.iterdir()) == []


async def store_says(store: Any, call_id: str, words: str, timeout_s: float = 30) -> None:
    """Wait until the call's record has an error with ``words`` in it."""
    async with asyncio.timeout(timeout_s):
        while True:
            rec = await store.get_call(call_id)
            if rec is not None and rec.error is not None and words in rec.error:
                return
            await asyncio.sleep(0.1)


async def test_the_worker_raises_its_soft_limit_of_open_files_to_the_hard_one(
    sqlite_cluster: Cluster,
) -> None:
    """A service manager's soft limit of 1024 would stop a worker at about a hundred
    containers: it takes all its hard limit allows."""
    await sqlite_cluster.register(echo("e"))
    calls = make_calls("t", "e", 1)
    await sqlite_cluster.enqueue(calls)
    worker = sqlite_cluster.start_worker(open_files=(256, 4096))
    await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=60)
    limits = Path(f"/proc/{worker.pid}/limits").read_text()
    assert re.search(r"^Max open files\s+4096\s+4096\s+files", limits, re.MULTILINE), limits
    assert "open files limit raised from 256 to 4096" in sqlite_cluster.logs()


async def test_a_full_datastore_disk_keeps_the_calls_and_a_stop_leaves_them_to_lapse(
    sqlite_cluster: Cluster, tmp_path: Path
) -> None:
    """The datastore's disk fills up while calls run: their outcomes wait in the
    worker, none is acked. Stopped meanwhile, the worker leaves their messages to
    come back when their reservations lapse, says so in one warning and in its last
    line, and exits 0. With room again, another worker runs and records every one."""
    with small_tmpfs(tmp_path / "db", "size=2m") as directory:
        path = directory / "fnq.db"
        sqlite_cluster.env["FN_DB_URL"] = sqlite_url(path)
        sqlite_cluster.env["FN_SHUTDOWN_GRACE_MSECS"] = "1000"
        await sqlite_cluster.register(echo("e"))
        first = sqlite_cluster.start_worker("--prefetch", "8")
        await until_seen(sqlite_cluster)
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a write must grow the -wal
        filler = fill_space(directory)
        calls = make_calls("t", "e", 30, body=b"x" * 4096)
        queue = open_queue(sqlite_cluster.settings.mq_url, sqlite_cluster.settings)
        try:
            await queue.push_many(calls)  # as a Python producer: no record
            async with asyncio.timeout(60):
                while (await queue.stats()).reserved < 30 or "database or disk is full" not in (
                    sqlite_cluster.logs()
                ):
                    await asyncio.sleep(0.1)
            assert (await queue.stats()).ready == 0  # none acked, none lost
        finally:
            await queue.close()
        sqlite_cluster.stop_all(signal.SIGTERM)
        assert first.returncode == 0
        logs = sqlite_cluster.logs()
        assert logs.count("its message returns when its reservation lapses (") == 1, logs
        # Those still waiting for a container went back at once; the others ran.
        last = re.search(r"(\d+) handed back to the queue, (\d+) left to come back as their "
                         r"reservations lapse\n", logs)  # fmt: skip
        assert last is not None, logs
        assert int(last[1]) + int(last[2]) == 30 and int(last[2]) > 0, logs
        filler.unlink()
        sqlite_cluster.start_worker()
        done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=60)
        assert {rec.status for rec in done.values()} == {CallStatus.SUCCESS}


async def until_seen(cluster: Cluster, timeout_s: float = 30) -> None:
    """Until a worker has written its first heartbeat (it has opened everything)."""
    store = await open_datastore(cluster.settings)
    try:
        async with asyncio.timeout(timeout_s):
            while not await store.list_workers(timedelta(seconds=60)):
                await asyncio.sleep(0.1)
    finally:
        await store.close()
