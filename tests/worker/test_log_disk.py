"""A worker whose call logs find no room, end to end: a real `fnq worker` process,
real engine, SQLite queue and datastore, FN_LOG_URL on a small tmpfs filled up.
Each call runs once (the function keeps a tally the test reads), its outcome kept
until its log can be written; a worker stopped meanwhile exits cleanly and loses
no call."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.domain import CallStatus, Function
from datastore.base import open_datastore
from mq.base import open_queue
from tests.rig import fill_space, small_tmpfs
from tests.worker.conftest import Cluster, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CALLS = 6
NO_ROOM = "no room for call logs"
# A call handed back for a fault comes again after 5 s (worker.calls.RETRY_LATER_S).
WATCH_S = 8.0

TALLY = Function(app="t", name="tally", image="fnq/tally:latest", memory_mb=32, timeout_s=20,
                 idle_timeout_s=300, max_attempts=2, retry_backoff_s=0.2)  # fmt: skip


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "logs", "size=1m") as directory:
        yield directory


@pytest.fixture
def socket_dirs() -> Iterator[Path]:
    """FN_IOFS_PATH, where the test reads the functions' tallies: a short path (socket
    paths must fit in 107 bytes)."""
    top = Path(tempfile.mkdtemp(prefix="fnq-t-"))
    try:
        yield top / "io"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def cluster(sqlite_cluster: Cluster, log_dir: Path, socket_dirs: Path) -> Cluster:
    sqlite_cluster.env["FN_LOG_URL"] = f"file://{log_dir}"
    sqlite_cluster.env["FN_IOFS_PATH"] = str(socket_dirs)
    return sqlite_cluster


def tallies(socket_dirs: Path) -> Counter[str]:
    """How many times each call ran in the containers there now."""
    runs: Counter[str] = Counter()
    for path in socket_dirs.glob("*/runs.txt"):
        runs.update(path.read_text().split())
    return runs


async def all_ran_once(cluster: Cluster, socket_dirs: Path, ids: list[str]) -> None:
    """Until every call has run; then, for WATCH_S more, that none runs again. The
    worker has said once that their logs find no room."""
    async with asyncio.timeout(60):
        while set(tallies(socket_dirs)) != set(ids):
            await asyncio.sleep(0.2)
    until = time.monotonic() + WATCH_S
    while time.monotonic() < until:
        assert tallies(socket_dirs) == dict.fromkeys(ids, 1), cluster.logs()[-3000:]
        await asyncio.sleep(0.2)
    assert cluster.logs().count(NO_ROOM) == 1, cluster.logs()


async def queue_stats(cluster: Cluster) -> Any:
    queue = open_queue(cluster.settings.mq_url, cluster.settings)
    try:
        return await queue.stats()
    finally:
        await queue.close()


def containers_of(cluster: Cluster, docker_engine: Any) -> list[Any]:
    tag = cluster.env["FN_CONTAINER_LABEL_TAG"]
    return list(docker_engine.containers.list(all=True, filters={"label": f"fnq.classifier={tag}"}))


async def test_calls_run_once_while_their_logs_wait_for_room_and_end_with_them(
    cluster: Cluster, log_dir: Path, socket_dirs: Path, docker_engine: Any
) -> None:
    await cluster.register(TALLY)
    calls = make_calls("t", "tally", CALLS)
    ids = [c.id for c in calls]
    await cluster.enqueue(calls)
    filler = fill_space(log_dir)
    worker = cluster.start_worker("--prefetch", "8")
    await all_ran_once(cluster, socket_dirs, ids)
    stats = await queue_stats(cluster)
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, CALLS)  # none handed back
    store = await open_datastore(cluster.settings)
    try:
        records = await store.get_calls(ids)
        assert not any(r.is_final for r in records.values())
    finally:
        await store.close()
    filler.unlink()
    done = await cluster.wait_final(ids, timeout_s=60)
    assert {(r.status, r.attempts) for r in done.values()} == {(CallStatus.SUCCESS, 1)}
    for call_id in ids:
        log = await cluster.log_of(call_id)
        assert log is not None and f"tally {call_id}\n".encode() in log, log
    assert tallies(socket_dirs) == dict.fromkeys(ids, 1)
    assert (await queue_stats(cluster)).reserved == 0  # all acked
    logs = cluster.logs()
    assert logs.count(NO_ROOM) == 1, logs
    assert logs.count("call logs are written again after") == 1, logs
    assert "goes back to the queue" not in logs
    assert "Traceback" not in logs
    assert worker.poll() is None
    cluster.stop_all(signal.SIGTERM)
    assert worker.returncode == 0
    assert containers_of(cluster, docker_engine) == []


async def test_a_worker_stopped_while_logs_wait_exits_and_loses_no_call(
    cluster: Cluster, log_dir: Path, socket_dirs: Path, docker_engine: Any
) -> None:
    """Stopped while its calls' logs find no room, the worker gives them the grace
    period, then leaves their messages to come back when their reservations lapse,
    and exits 0. Another worker, with room, runs and records them."""
    cluster.env["FN_SHUTDOWN_GRACE_MSECS"] = "1000"
    await cluster.register(TALLY)
    calls = make_calls("t", "tally", CALLS)
    ids = [c.id for c in calls]
    await cluster.enqueue(calls)
    filler = fill_space(log_dir)
    first = cluster.start_worker("--prefetch", "8")
    await all_ran_once(cluster, socket_dirs, ids)
    started = time.monotonic()
    cluster.stop_all(signal.SIGTERM)
    stop_s = time.monotonic() - started
    assert first.returncode == 0
    assert stop_s < 20, stop_s
    logs = cluster.logs()
    closes = f"the datastore closes with {CALLS} call log(s) still waiting to be written"
    assert closes in logs, logs
    last = rf"stopped after 0 call\(s\) ended here, 0 handed back to the queue, {CALLS} left"
    assert re.search(last + " to come back as their reservations lapse\n", logs), logs
    assert "Traceback" not in logs
    stats = await queue_stats(cluster)
    assert stats.ready + stats.delayed + stats.reserved == CALLS and stats.dead == 0
    assert containers_of(cluster, docker_engine) == []
    filler.unlink()
    cluster.start_worker()
    done = await cluster.wait_final(ids, timeout_s=120)
    assert {r.status for r in done.values()} == {CallStatus.SUCCESS}
    for call_id in ids:
        log = await cluster.log_of(call_id)
        assert log is not None and f"tally {call_id}\n".encode() in log, log
    # The first worker's run left no outcome: the second one ran each call again.
    assert tallies(socket_dirs) == dict.fromkeys(ids, 1)
