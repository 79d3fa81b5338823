"""Process failures under a burst: real `fnq worker` processes, redis-server,
PostgreSQL and the docker engine, killed or restarted while calls flow.

Each test queues a bounded burst of echo calls, and of sleep calls long enough
to be caught in their containers, breaks something once the burst is under
way, and then checks call by call what docs/worker.md and docs/queue.md
promise: every call ends with one final record, a record that was final stays
as it was, and a call runs again only where the documents say it may.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue

from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings
from datastore.base import CallRecord, open_datastore
from mq.base import QueueStats, open_queue
from tests.rig import RedisServer, free_port
from tests.worker.conftest import Cluster, base_env, images, make_calls

__all__ = ["images"]  # the function images, built once per session (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ECHO = Function(
    app="chaos", name="echo", image="fnq/echo:latest", memory_mb=64, timeout_s=20,
    max_attempts=3, retry_backoff_s=0.2,
)  # fmt: skip
SLEEP = Function(
    app="chaos", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=20,
    max_attempts=3, retry_backoff_s=0.2,
)  # fmt: skip
SLEEP_BODY = b"1"  # long past the `running` mark: each start of a sleep call is counted
POLL_S = 0.05
RQ_DB = 9  # rq's key names are fixed: its own database, flushed per test
HOST = os.uname().nodename


@dataclass
class Burst:
    echo: list[Call]
    sleep: list[Call]

    @property
    def calls(self) -> list[Call]:
        """Queued in this order: a sleep call after every few echo calls, so that sleep
        calls are in containers all through the burst."""
        step = max(1, len(self.echo) // max(1, len(self.sleep)))
        out: list[Call] = []
        sleeps = iter(self.sleep)
        for i, call in enumerate(self.echo):
            out.append(call)
            if i % step == step - 1:
                out.extend(c for c in [next(sleeps, None)] if c is not None)
        out.extend(sleeps)
        return out

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.calls]


def burst(echo: int, sleep: int, body: bytes = SLEEP_BODY) -> Burst:
    return Burst(make_calls("chaos", "echo", echo), make_calls("chaos", "sleep", sleep, body))


async def burst_under_way(
    chaos: Chaos, echo: int, sleep: int, body: bytes = SLEEP_BODY, final: int = 40
) -> tuple[Burst, Worker]:
    """Register, queue a burst of ``echo`` echo and ``sleep`` sleep calls, start a
    worker, and wait until the burst is under way: ``final`` calls final and two sleep
    calls running on that worker (the moment the tests kill, stop or cut it off)."""
    await chaos.register()
    b = burst(echo, sleep, body)
    sleep_ids = {c.id for c in b.sleep}
    await chaos.enqueue(b.calls)
    worker = chaos.start()
    await chaos.wait(
        b.ids,
        lambda r: finals(r) >= final and len(running_on(r, worker) & sleep_ids) >= 2,
        f"under way ({final} final, two sleep calls running)",
    )
    return b, worker


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int = 0

    @property
    def id(self) -> str:
        """The id its records and containers carry (config.domain.hostname_id)."""
        return f"{HOST}:{self.proc.pid}"

    def kill(self) -> None:
        """SIGKILL, and reap it: a zombie would still look alive to the next worker."""
        self.proc.kill()
        self.proc.wait(10)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of its Prometheus metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        sample = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
        found = re.search("^" + sample + r" (\S+)$", text, re.MULTILINE)
        if found is None:
            raise AssertionError(f"no {name}{{{labels}}} in the metrics:\n{text[:2000]}")
        return float(found.group(1))

    async def wait_metric(self, name: str, at_least: float, timeout_s: float = 20) -> float:
        deadline = time.monotonic() + timeout_s
        while (value := self.metric(name)) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} is {value} after {timeout_s}s, not {at_least}")
            await asyncio.sleep(POLL_S)
        return value


@dataclass
class Chaos:
    """A cluster on one queue backend: ``redis`` (streams), ``rq`` (RQ jobs, the
    worker's own queue SQLite and empty) or ``sqlite``."""

    cluster: Cluster
    backend: str
    rq_url: str = ""
    workers: list[Worker] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.cluster.settings

    async def register(self) -> None:
        await self.cluster.register(ECHO)
        await self.cluster.register(SLEEP)

    async def enqueue(self, calls: list[Call]) -> None:
        """As a producer of that backend does: `fnq call`'s way (a `queued` record,
        then the message), or an RQ job (no record until a worker takes it)."""
        if self.backend != "rq":
            await self.cluster.enqueue(calls)
            return
        redis = Redis.from_url(self.rq_url)
        try:
            q = Queue("chaos", connection=redis, serializer="json")
            for c in calls:
                q.enqueue("fnq.call", app=c.app, fn=c.fn, body=c.body.decode(), job_id=c.id)
        finally:
            redis.close()

    def start(self, *args: str, metrics: bool = False) -> Worker:
        port = free_port() if metrics else 0
        self.cluster.env["FN_METRICS_PORT"] = str(port)
        worker = Worker(self.cluster.start_worker("--prefetch", "8", *args), port)
        self.workers.append(worker)
        return worker

    async def records(self, ids: list[str]) -> dict[str, CallRecord]:
        store = await open_datastore(self.settings)
        try:
            return await store.get_calls(ids)
        finally:
            await store.close()

    async def wait(
        self,
        ids: list[str],
        done: Callable[[dict[str, CallRecord]], bool],
        what: str,
        timeout_s: float = 30,
    ) -> dict[str, CallRecord]:
        """Poll the records of ``ids`` until ``done`` says so; fail after ``timeout_s``.
        A datastore that cannot be read (it may be the thing restarting) is polled on."""
        deadline = time.monotonic() + timeout_s
        recs: dict[str, CallRecord] = {}
        while True:
            try:
                recs = await self.records(ids)
            except Exception:
                recs = {}
            if recs and done(recs):
                return recs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not {what} after {timeout_s}s: {by_status(recs)}\n"
                    f"--- worker logs ---\n{self.cluster.logs()[-6000:]}"
                )
            await asyncio.sleep(POLL_S)

    async def wait_final(self, ids: list[str], timeout_s: float = 30) -> dict[str, CallRecord]:
        return await self.wait(
            ids, lambda r: len(r) == len(ids) and finals(r) == len(ids), "all final", timeout_s
        )

    async def wait_log(self, text: str, times: int = 1, timeout_s: float = 20) -> None:
        """Wait until the workers' logs hold ``text`` ``times`` times."""
        deadline = time.monotonic() + timeout_s
        while self.cluster.logs().count(text) < times:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the logs after {timeout_s}s:\n"
                                     f"{self.cluster.logs()[-4000:]}")  # fmt: skip
            await asyncio.sleep(POLL_S)

    async def queue_stats(self) -> QueueStats:
        settings = self.settings
        queue = open_queue(settings.mq_url, settings)
        try:
            return await queue.stats()
        finally:
            await queue.close()

    def containers(self, owner: Worker | None = None) -> list[str]:
        """The ids of the test's containers (any state), those of one worker if told."""
        tag = self.cluster.env["FN_CONTAINER_LABEL_TAG"]
        filters = ["--filter", f"label=fnq.classifier={tag}"]
        if owner is not None:
            filters += ["--filter", f"label=fnq.owner={owner.id}"]
        found = subprocess.run(
            ["docker", "ps", "-aq", "--no-trunc", *filters],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return found.stdout.split()

    async def wait_no_containers(self, owner: Worker | None = None, timeout_s: float = 15) -> float:
        """Wait until none of those containers is left; how long that took."""
        start = time.monotonic()
        while left := self.containers(owner):
            if time.monotonic() - start > timeout_s:
                raise AssertionError(
                    f"containers still there after {timeout_s}s: {left}\n"
                    f"{self.cluster.logs()[-4000:]}"
                )
            await asyncio.sleep(0.2)
        return time.monotonic() - start


def by_status(recs: dict[str, CallRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in recs.values():
        out[rec.status.value] = out.get(rec.status.value, 0) + 1
    return out


def finals(recs: dict[str, CallRecord]) -> int:
    return sum(r.status.is_final for r in recs.values())


def running_on(recs: dict[str, CallRecord], worker: Worker) -> set[str]:
    return {
        i for i, r in recs.items() if r.status is CallStatus.RUNNING and r.worker_id == worker.id
    }


def chaos_env(env: dict[str, str]) -> dict[str, str]:
    """Settings the chaos tests share: short reservations (a killed worker's calls come
    back within 2 s), no pauses."""
    env.update(
        {
            "FN_MQ_RESERVATION_MSECS": "2000",
            "FN_ASYNC_CHEW_POLL_MSECS": "500",
            "FN_FREEZE_IDLE_MSECS": "-1",
        }
    )
    return env


def make_chaos(
    tmp: Path, backend: str, redis_server: RedisServer | None, db_url: str = ""
) -> Chaos:
    sqlite_mq = f"sqlite:///{tmp / 'data' / 'mq.db'}"
    if backend == "redis":
        assert redis_server is not None
        mq_url = f"{redis_server.url}?prefix=c{new_call_id()[-8:].lower()}"
    else:
        mq_url = sqlite_mq
    cluster = Cluster(chaos_env(base_env(tmp, mq_url, db_url or None)), tmp)
    chaos = Chaos(cluster, backend)
    if backend == "rq":
        assert redis_server is not None
        chaos.rq_url = f"redis://127.0.0.1:{redis_server.port}/{RQ_DB}"
        Redis.from_url(chaos.rq_url).flushdb()
        cluster.env["FN_RQ_QUEUES"] = "chaos"
        cluster.env["FN_RQ_URL"] = chaos.rq_url
    return chaos


@pytest.fixture(params=["redis", "rq", "sqlite"])
def chaos(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, images: None
) -> Iterator[Chaos]:
    made = make_chaos(tmp_path, str(request.param), redis_server)
    yield made
    made.cluster.tear_down()
