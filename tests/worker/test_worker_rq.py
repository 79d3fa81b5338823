"""RQ producers hand calls to fnq and read the results back through RQ."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from config.domain import CallStatus, Function
from tests.rig import RedisServer
from tests.worker.conftest import Cluster, base_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RQ_DB = 8


@pytest.fixture
def rq_cluster(tmp_path: Path, redis_server: RedisServer, images: None) -> Iterator[Cluster]:
    url = f"redis://127.0.0.1:{redis_server.port}/{RQ_DB}"
    Redis.from_url(url).flushdb()
    cluster = Cluster(base_env(tmp_path, f"sqlite:///{tmp_path / 'data' / 'mq.db'}"), tmp_path)
    cluster.env["FN_RQ_QUEUES"] = "default"
    cluster.env["FN_RQ_URL"] = url
    yield cluster
    cluster.stop_all()


def wait_job(job: Job, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = job.get_status(refresh=True)
        if status in ("finished", "failed"):
            return str(getattr(status, "value", status))
        time.sleep(0.1)
    raise AssertionError(f"job {job.id} still {job.get_status()}")


async def test_rq_jobs_run_in_fnq_and_report_back_through_rq(rq_cluster: Cluster) -> None:
    await rq_cluster.register(Function(app="t", name="echo", image="fnq/echo:latest", memory_mb=64))
    await rq_cluster.register(
        Function(app="t", name="raise", image="fnq/raise:latest", memory_mb=64, max_attempts=1)
    )
    redis = Redis.from_url(rq_cluster.env["FN_RQ_URL"])
    q = Queue("default", connection=redis, serializer="json")
    ok = q.enqueue("fnq.call", app="t", fn="echo", body="hello rq",
                   headers={"Content-Type": "text/plain"})  # fmt: skip
    bad = q.enqueue("fnq.call", app="t", fn="raise", body="boom")
    other = q.enqueue("os.system", "echo not for fnq")
    pickled = Queue("default", connection=redis).enqueue("fnq.call", app="t", fn="echo")
    rq_cluster.start_worker()

    assert wait_job(ok) == "finished"
    assert ok.return_value() == {"status": 200, "headers": ok.return_value()["headers"],
                                 "body": "hello rq"}  # fmt: skip
    assert wait_job(bad) == "failed"
    assert "function failed" in (bad.latest_result().exc_string or "")
    assert wait_job(other) == "failed" and wait_job(pickled) == "failed"

    # The same call is in fnq's datastore under the RQ job id, with its log.
    done = await rq_cluster.wait_final([ok.id, bad.id])
    assert done[ok.id].status is CallStatus.SUCCESS and done[bad.id].status is CallStatus.ERROR
    # RQ's registries agree, and nothing is left "started".
    assert ok.id in FinishedJobRegistry("default", connection=redis)
    failed = FailedJobRegistry("default", connection=redis)
    assert {bad.id, other.id, pickled.id} <= set(failed.get_job_ids())
    assert StartedJobRegistry("default", connection=redis).get_job_ids() == []
    info = subprocess.run(
        ["rq", "info", "--raw", "-u", rq_cluster.env["FN_RQ_URL"], "default"],
        capture_output=True, text=True, check=True, timeout=30,
        env={**rq_cluster.env, "PATH": str(Path(__file__).parents[2] / ".venv/bin")},
    )  # fmt: skip
    assert "queue default 0, 0 executing, 1 finished, 3 failed" in info.stdout
    shown = json.loads(rq_cluster.fnq("calls", "show", ok.id, "--json").stdout)
    assert shown["status"] == "success"
