"""A worker on another host, as far as the network goes: real `fnq worker`
processes in a network namespace of their own, reaching redis-server and
PostgreSQL through a veth link, and that link cut in silence (packets dropped
by iptables inside the namespace: no reset, no error, half-open connections)
or slowed down (tests.network.proxy).

The namespace, its link and the servers that listen on it are made once per
session and removed at its end, whatever happens; every cut is healed after
each test.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from redis import Redis

from bench import _netns as netns
from config.domain import new_call_id
from mq.base import QueueStats
from mq.rq import open_rq_queues
from tests.chaos.conftest import RQ_DB, Chaos, Worker, chaos_env
from tests.rig import PostgresServer, RedisServer, missing, pg_tempdir
from tests.worker.conftest import Cluster, base_env, images

__all__ = ["images"]

IPTABLES_TIMEOUT_S = 30


@dataclass
class FarHost:
    """A network namespace linked to this one: a worker started there reaches the
    servers at ``addr``, and ``cut`` silences that link for one port."""

    link: netns.Link
    cuts: set[int]

    @property
    def addr(self) -> str:
        """Where the servers listen for it (the host side of the link)."""
        return self.link.host_addr

    def _iptables(self, action: str, port: int) -> None:
        for rule in (
            ["OUTPUT", "-o", self.link.ns_if, "-p", "tcp", "--dport", str(port)],
            ["INPUT", "-i", self.link.ns_if, "-p", "tcp", "--sport", str(port)],
        ):
            subprocess.run(
                [*self.link.exec_prefix, "iptables", action, *rule, "-j", "DROP"],
                check=True, capture_output=True, timeout=IPTABLES_TIMEOUT_S,
            )  # fmt: skip

    def cut(self, port: int) -> None:
        """Drop every packet to and from ``port`` on the link, both ways."""
        self._iptables("-I", port)
        self.cuts.add(port)

    def heal(self, port: int | None = None) -> None:
        """Let ``port`` (every port cut, when None) through again."""
        for p in [port] if port is not None else sorted(self.cuts):
            self._iptables("-D", p)
            self.cuts.discard(p)


@pytest.fixture(scope="session")
def far_link() -> Iterator[netns.Link]:
    reason = netns.unusable()
    if reason is not None:
        missing(f"network namespaces: {reason}")
    with netns.links(1, tag="p") as made:
        yield made[0]


@pytest.fixture
def far_host(far_link: netns.Link) -> Iterator[FarHost]:
    host = FarHost(far_link, set())
    try:
        yield host
    finally:
        host.heal()


@pytest.fixture(scope="session")
def far_redis(
    far_link: netns.Link, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("far-redis"), appendonly=True,
        bind=("127.0.0.1", far_link.host_addr),
    )  # fmt: skip
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def far_postgres(
    far_link: netns.Link, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgresServer]:
    pg = PostgresServer(
        pg_tempdir(tmp_path_factory.mktemp("far-pg")), bind=("127.0.0.1", far_link.host_addr)
    )
    pg.start()
    try:
        with (pg.directory / "data" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {far_link.ns_addr}/32 trust\n")
        pg.stop()
        pg.resume()
        yield pg
    finally:
        pg.stop()


async def new_database(pg: PostgresServer) -> str:
    """A database of its own for one test; its name."""
    import asyncpg  # noqa: PLC0415

    name = f"t{new_call_id()[-10:].lower()}"
    conn = await asyncpg.connect(pg.url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


@dataclass
class FarChaos(Chaos):
    """A Chaos cluster whose workers run on ``host``, and reach the servers through it."""

    host: FarHost | None = None
    far_env: dict[str, str] = field(default_factory=dict)  # the workers' own settings

    def start(self, *args: str, metrics: bool = False) -> Worker:
        """A worker on the far host (no metrics: its port would be in the namespace)."""
        assert self.host is not None and not metrics
        proc = self.cluster.start_worker(
            "--prefetch", "8", *args, wrapper=self.host.link.exec_prefix,
            env={**self.far_env, "FN_METRICS_PORT": "0"},
        )  # fmt: skip
        worker = Worker(proc)
        self.workers.append(worker)
        return worker


def far_chaos(
    tmp: Path,
    host: FarHost,
    backend: str,
    redis: RedisServer,
    pg: PostgresServer | None = None,
    database: str = "",
) -> FarChaos:
    """Workers on ``host`` with a queue of ``backend`` (``redis``: streams, ``rq``: RQ
    jobs) on ``redis`` and the datastore on ``pg`` (SQLite when None). The test's own
    processes use the loopback addresses; the workers, the link's."""
    prefix = f"c{new_call_id()[-8:].lower()}"
    far = f"redis://{host.addr}:{redis.port}"
    sqlite_mq = f"sqlite:///{tmp / 'data' / 'mq.db'}"
    mq_url = f"{redis.url}?prefix={prefix}" if backend == "redis" else sqlite_mq
    db_url = f"{pg.url.rsplit('/', 1)[0]}/{database}" if pg is not None else None
    cluster = Cluster(chaos_env(base_env(tmp, mq_url, db_url)), tmp)
    chaos = FarChaos(cluster, backend, host=host)
    if backend == "redis":
        chaos.far_env["FN_MQ_URL"] = f"{far}/0?prefix={prefix}"
    else:
        chaos.rq_url = f"redis://127.0.0.1:{redis.port}/{RQ_DB}"
        Redis.from_url(chaos.rq_url).flushdb()
        cluster.env["FN_RQ_QUEUES"] = "chaos"
        cluster.env["FN_RQ_URL"] = chaos.rq_url
        chaos.far_env["FN_RQ_URL"] = f"{far}/{RQ_DB}"
    if pg is not None:
        chaos.far_env["FN_DB_URL"] = f"postgresql://{pg.user}@{host.addr}:{pg.port}/{database}"
    return chaos


STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def logged_at(logs: str, text: str) -> list[float]:
    """When the worker log lines holding ``text`` were written (time.time() seconds)."""
    out = []
    for line in logs.splitlines():
        found = STAMP.match(line)
        if found and text in line:
            stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
            out.append(stamp.timestamp())
    return out


def empty_reasons(logs: str) -> list[str]:
    """Warning and error lines that end on a colon: a reason left out."""
    return [
        line
        for line in logs.splitlines()
        if (found := STAMP.match(line)) is not None
        and found.group(2) in ("WARNING", "ERROR")
        and line.rstrip().endswith(":")
    ]


async def wait_logged(chaos: Chaos, text: str, after: float, timeout_s: float) -> float:
    """Wait until a worker logs a line holding ``text`` at ``after`` (time.time()) or
    later; how long after ``after`` it came. Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (times := [t for t in logged_at(chaos.cluster.logs(), text) if t >= after - 0.01]):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {text!r} in the logs {timeout_s:g} s after it was due:\n"
                f"{chaos.cluster.logs()[-4000:]}"
            )
        await asyncio.sleep(0.1)
    return times[0] - after


async def wait_queue_empty(chaos: Chaos, timeout_s: float = 30) -> QueueStats:
    """Wait until the queue holds nothing (the messages whose acks were lost come back
    when their reservations lapse, and are settled then); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await queue_stats(chaos)
        if (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue still holds {stats} after {timeout_s:g} s")
        await asyncio.sleep(0.2)


async def queue_stats(chaos: Chaos) -> QueueStats:
    """The depth of the cluster's queue: its RQ queue on the ``rq`` backend."""
    if chaos.backend != "rq":
        return await chaos.queue_stats()
    queue = open_rq_queues(chaos.rq_url, ["chaos"], chaos.settings)
    try:
        return await queue.stats()
    finally:
        await queue.close()


async def wait_blocked(
    server: RedisServer, host: FarHost, for_s: float, timeout_s: float = 30
) -> None:
    """Wait until a client from ``host`` has waited ``for_s`` in a blocking command
    (XREADGROUP BLOCK: an idle worker's reserve), as the server's CLIENT LIST says."""
    redis = Redis(port=server.port)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for client in redis.client_list():
                if (
                    client["addr"].startswith(f"{host.link.ns_addr}:")
                    and "b" in client["flags"]
                    and int(client["idle"]) >= for_s
                ):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"no client of {host.addr} blocked for {for_s} s")
            await asyncio.sleep(0.2)
    finally:
        redis.close()
