"""The docker engine restarting under a worker (runs last: it restarts dockerd).

What a call in flight sees depends on the engine: dockerd stops containers
gracefully on its own shutdown, so a call may finish; if its container dies
first, the call fails as a function error and is retried.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from config.domain import CallStatus, Function
from datastore.base import open_datastore
from tests.rig import missing
from tests.worker.conftest import Cluster, by_status, make_calls

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PIDFILE = Path("/var/run/docker.pid")
REPO = Path(__file__).resolve().parents[2]


def engine_answers() -> bool:
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return probe.returncode == 0


def restart_engine() -> None:
    """Stop dockerd (its containers die with it) and start it again as setup does."""
    pid = int(PIDFILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    subprocess.run([str(REPO / "scripts/setup.sh"), "--no-images"], check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    assert engine_answers()


def containers_of(cluster: Cluster, app: str, fn: str) -> list[str]:
    tag = cluster.env["FN_CONTAINER_LABEL_TAG"]
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=fnq.classifier={tag}",
         "--filter", f"label=fnq.app={app}", "--filter", f"label=fnq.fn={fn}"],
        capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    return out.stdout.split()


async def test_engine_restart_fails_running_calls_into_retries_and_recovers(
    sqlite_cluster: Cluster,
) -> None:
    if os.geteuid() != 0 or not PIDFILE.exists():
        missing("restarting the docker engine needs root and a dockerd with a pid file")
    sleep = Function(app="t", name="sleep", image="fnq/sleep:latest", memory_mb=64,
                     timeout_s=30, max_attempts=3, retry_backoff_s=0.5)  # fmt: skip
    await sqlite_cluster.register(sleep)
    calls = make_calls("t", "sleep", 2, body=b"8")
    await sqlite_cluster.enqueue(calls)
    sqlite_cluster.start_worker()
    store = await open_datastore(sqlite_cluster.settings)
    try:
        for _ in range(300):
            recs = [await store.get_call(c.id) for c in calls]
            if all(r is not None and r.status is CallStatus.RUNNING for r in recs):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("calls never ran\n" + sqlite_cluster.logs()[-3000:])
    finally:
        await store.close()
    # Restart only once both calls are inside their containers (a restart while the
    # containers are still starting is a not-started failure: no attempt is charged).
    for _ in range(300):
        if len(containers_of(sqlite_cluster, "t", "sleep")) == 2:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no containers\n" + sqlite_cluster.logs()[-3000:])
    await asyncio.sleep(2.5)  # the FDK is listening within about 1 s; the calls sleep 8 s
    await asyncio.to_thread(restart_engine)
    done = await sqlite_cluster.wait_final([c.id for c in calls], timeout_s=120)
    # dockerd stops its containers gracefully (SIGTERM, then SIGKILL after 10 s), so a
    # call in flight either finishes before its container goes or fails with it and is
    # retried on a new one: each call succeeds, and runs at most twice.
    assert by_status(done) == {CallStatus.SUCCESS: 2}, sqlite_cluster.logs()[-3000:]
    assert all(r.attempts in (1, 2) for r in done.values()), [r.attempts for r in done.values()]
    before = {r.container_id for r in done.values()}
    # The worker keeps working after the restart.
    more = make_calls("t", "sleep", 3, body=b"0")
    await sqlite_cluster.enqueue(more)
    again = await sqlite_cluster.wait_final([c.id for c in more], timeout_s=60)
    assert by_status(again) == {CallStatus.SUCCESS: 3}
    # The pool was rebuilt: the engine lost the old containers, new calls got new ones.
    assert not before & {r.container_id for r in again.values()}
