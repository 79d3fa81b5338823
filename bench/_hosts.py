"""The "3 workers as 3 hosts" runs of bench.scaling (described there).

Workers in network namespaces of their own (bench._netns), with one redis-server
and one PostgreSQL (tests.rig) listening on the host sides of the veth links.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from bench import _netns as netns
from bench._cluster import Cluster, make_calls, stop
from bench._common import Section, Table, label_tag, median
from bench.e2e import APP, BODY, echo, warm_bursts
from config.domain import CallStatus

if TYPE_CHECKING:
    from tests.rig import PostgresServer, RedisServer

HOSTS = 3


@dataclass
class HostsRun:
    workers: int
    rate: float  # median calls/s
    calls: int  # timed calls, all repeats
    final: int  # of them with a final record
    success: int
    rerun: int  # attempts > 1: run more than once
    per_worker: list[int] = field(default_factory=list)  # final records per worker id
    veth_mb: float = 0.0  # through the host sides of the links, whole run


async def create_database(server: PostgresServer, name: str) -> str:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{server.url.rsplit('/', 1)[0]}/{name}"


async def timed_calls(cluster: Cluster, n: int) -> tuple[float, list[str]]:
    """Push ``n`` calls at once; (calls/s first push to last final record, their ids)."""
    done = await cluster.final_count(APP)
    calls = make_calls(APP, "echo", n, BODY)
    t0 = time.perf_counter()
    await cluster.push(calls)
    t1 = await cluster.wait_final(APP, done + n)
    return n / (t1 - t0), [c.id for c in calls]


async def wait_workers(cluster: Cluster, count: int, timeout_s: float = 60.0) -> None:
    """Until ``count`` workers have written their heartbeat (so reached PostgreSQL)."""
    assert cluster.store is not None
    deadline = time.monotonic() + timeout_s
    while len(await cluster.store.list_workers(timedelta(minutes=5))) < count:
        if any(p.poll() is not None for p in cluster.procs):
            raise RuntimeError(f"a worker exited\n--- worker logs ---\n{cluster.worker_logs()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not all up after {timeout_s}s\n{cluster.worker_logs()}")
        await asyncio.sleep(0.1)


async def warm_all(cluster: Cluster, count: int, rounds: int = 10) -> None:
    """Rounds of 20 calls per worker until every worker has run one (its container hot)."""
    for _ in range(rounds):
        ids = (await timed_calls(cluster, 20 * count))[1]
        if len({r.worker_id for r in await cluster.records(ids)}) >= count:
            return


async def hosts_run(
    tmp: Path,
    redis: RedisServer,
    pg: PostgresServer,
    links: list[netns.Link],
    n: int,
    repeats: int,
) -> HostsRun:
    """One worker per link, each in its namespace, on a fresh database and queue prefix."""
    k = len(links)
    db = f"hosts{k}_{secrets.token_hex(3)}"
    prefix = f"h{secrets.token_hex(3)}"
    db_url = await create_database(pg, db)
    cluster = Cluster(tmp / f"h{k}", f"{redis.url}?prefix={prefix}", label_tag(), db_url=db_url)
    bytes0 = netns.traffic_bytes(links)
    try:
        await cluster.open()
        await cluster.register(echo())
        for link in links:
            env = {
                "FN_MQ_URL": f"redis://{link.host_addr}:{redis.port}/0?prefix={prefix}",
                "FN_DB_URL": f"postgresql://{pg.user}@{link.host_addr}:{pg.port}/{db}",
            }
            cluster.start_worker(prefix=link.exec_prefix, env=env)
        await wait_workers(cluster, k)
        await warm_all(cluster, k)
        await warm_bursts(cluster, n)  # and to the containers a burst leads them to
        rates, ids = [], []
        for _ in range(repeats):
            rate, batch = await timed_calls(cluster, n)
            rates.append(rate)
            ids += batch
            await asyncio.sleep(0.5)
        recs = await cluster.records(ids)
    finally:
        await stop(cluster)
    final = [r for r in recs if r.is_final]
    return HostsRun(
        workers=k,
        rate=median(rates),
        calls=len(ids),
        final=len(final),
        success=sum(r.status == CallStatus.SUCCESS for r in final),
        rerun=sum(r.attempts > 1 for r in final),
        per_worker=sorted(Counter(r.worker_id for r in final).values(), reverse=True),
        veth_mb=(netns.traffic_bytes(links) - bytes0) / 1e6,
    )


async def hosts_measure(tmp: Path, n: int, repeats: int) -> tuple[list[HostsRun], list[str]] | str:
    """1 then ``HOSTS`` workers in namespaces; (runs, leftovers) or why it could not run."""
    from tests.rig import PostgresServer, RedisServer, pg_tempdir  # noqa: PLC0415

    reason = netns.unusable()
    if reason is not None:
        return reason
    try:
        with netns.links(HOSTS) as links:
            addrs = ("127.0.0.1", *(link.host_addr for link in links))
            (tmp / "hosts-redis").mkdir()
            redis = RedisServer(tmp / "hosts-redis", bind=addrs)
            pg = PostgresServer(pg_tempdir(tmp), bind=addrs)
            try:
                redis.start()
                pg.start()
                with (pg.directory / "data" / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {netns.NET}.0.0/16 trust\n")
                pg.stop()
                pg.resume()
                runs = [
                    await hosts_run(tmp, redis, pg, links[:1], n, repeats),
                    await hosts_run(tmp, redis, pg, links, n, repeats),
                ]
            finally:
                redis.stop()
                pg.stop()
        return runs, netns.leftovers(links)
    except netns.NetnsError as exc:
        return f"network namespaces could not be set up: {exc}"


def hosts_report(sec: Section, result: tuple[list[HostsRun], list[str]] | str) -> None:
    title = f"{HOSTS} workers as {HOSTS} hosts (a network namespace each; Redis + PostgreSQL)"
    if isinstance(result, str):
        sec.notes.append(f"{title}: not measured, {result}.")
        return
    runs, left = result
    one = runs[0].rate
    sec.tables.append(
        Table(
            title,
            [
                "workers",
                "calls/s",
                "vs 1 worker",
                "final / calls",
                "success",
                "run twice",
                "final records per worker",
                "veth MB",
            ],
            [
                [
                    str(r.workers),
                    r.rate,
                    f"{r.rate / one:.2f}x",
                    f"{r.final}/{r.calls}",
                    r.success,
                    r.rerun,
                    " / ".join(str(c) for c in r.per_worker),
                    r.veth_mb,
                ]
                for r in runs
            ],
        )
    )
    many = runs[-1]
    sec.check(
        f"{HOSTS} hosts: every call final, run once",
        f"{many.final}/{many.calls}, {many.rerun} twice",
        "all, 0 twice",
        many.final == many.calls and many.rerun == 0,
    )
    sec.check(
        f"{HOSTS} hosts: workers that ran calls",
        str(len(many.per_worker)),
        str(HOSTS),
        len(many.per_worker) == HOSTS,
    )
    sec.notes.append(
        f"{title}: calls/s over the timed calls (median of the repeats); `final / calls` "
        "and the rest count every timed call's record (a call run twice would show "
        "attempts > 1); `veth MB` is the traffic through the host sides of the links "
        "over the whole run (start, warm-up, timed calls). Warm-up: calls until every "
        "worker has run one, then bursts of the timed size until one starts no container "
        "(at most three). "
        + (f"Left behind: {', '.join(left)}." if left else "Namespaces and veths removed.")
    )
