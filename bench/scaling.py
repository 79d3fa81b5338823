"""Scaling: 1 against 2 worker processes, 10 functions at once with and without eviction,
and 1 against 3 workers each in a network namespace of its own ("3 hosts").

    .venv/bin/python -m bench.scaling            # 2,000 calls per run
    .venv/bin/python -m bench.scaling --quick    # 300 calls per run

Same set-up as bench.e2e (Redis queue, SQLite datastore, ``fnq/echo``; PostgreSQL
for the 3-host runs).

* workers: N calls pushed at once, run by one, then by two ``fnq worker``
  processes; calls/s first push to last final record. Warmed as bench.e2e warms
  its worker (bursts of N until one starts no container, at most three); the
  table counts the containers then, and those started while timed.
* 10 functions: the same N calls spread round-robin over 10 functions (each its
  own slot queue), once with room for all (default memory), once with
  FN_MAX_TOTAL_MEMORY_BYTES set to room for 4 containers of 128 MB, so that the
  worker has to evict idle containers of other functions to launch. The run
  with room for all is warmed as the worker runs are; in the tight one the
  containers started are counted from the records' container ids.
* 3 hosts (bench._hosts): 3 network namespaces (bench._netns), each joined to
  the host by a veth pair on its own /30; one redis-server and one PostgreSQL
  listen on the host sides (PostgreSQL trusts 10.231.0.0/16). Each ``fnq
  worker`` runs in its own namespace (``ip netns exec``) with FN_MQ_URL and
  FN_DB_URL on the host address of its link, so all its queue and datastore
  traffic crosses a veth as it would cross a network; docker is reached on its
  unix socket. The benchmark pushes and counts from the host namespace. N calls
  pushed at once, run by 1 worker (1 namespace), then by 3 workers (3
  namespaces), a fresh database each; calls/s as above, plus checks: every call
  has a final record and ran once (attempts = 1), and every worker took calls
  (distinct worker ids in the records). Without root or iproute2 the section
  says so in a note instead. Everything made (namespaces, veths, servers) is
  removed on the way out.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path

from bench._cluster import Cluster, make_calls, stop
from bench._common import Section, Table, label_tag, labelled, median, run
from bench._hosts import hosts_measure, hosts_report
from bench.e2e import APP, BODY, WARM_BURSTS_MAX, echo, fnq_throughput, warm, warm_bursts
from config.domain import Function
from datastore.base import CallRecord

FUNCTIONS = 10
TIGHT_CONTAINERS = 4


async def workers_run(
    tmp: Path, redis_url: str, workers: int, n: int, repeats: int
) -> tuple[float, int, int]:
    """calls/s (median), containers after the warm-up, containers started while timed."""
    cluster = Cluster(
        tmp / f"w{workers}", f"{redis_url}?prefix=s{secrets.token_hex(3)}", label_tag()
    )
    try:
        await cluster.open()
        await cluster.register(echo())
        for _ in range(workers):
            cluster.start_worker()
        warm_containers = await warm_bursts(cluster, n)
        rate = median(await fnq_throughput(cluster, n, repeats))
        return rate, warm_containers, labelled(cluster.tag) - warm_containers
    finally:
        await stop(cluster)


async def functions_run(
    tmp: Path, redis_url: str, n: int, tight: bool, repeats: int = 1
) -> tuple[float, int, int]:
    """calls/s (median of ``repeats``), containers after the warm-up, containers
    started while timed (tight: the distinct containers the timed calls ran in)."""
    extra = {}
    if tight:
        extra["FN_MAX_TOTAL_MEMORY_BYTES"] = str(TIGHT_CONTAINERS * 128 * 1024 * 1024)
    cluster = Cluster(
        tmp / f"f{int(tight)}",
        f"{redis_url}?prefix=f{secrets.token_hex(3)}",
        label_tag(),
        extra_env=extra,
    )
    try:
        await cluster.open()
        fns = [echo(f"echo{i}") for i in range(FUNCTIONS)]
        await cluster.register(*fns)
        cluster.start_worker()
        if tight:
            await warm(cluster, fns[0].name, 5)
            rate, recs = await _round_robin(cluster, fns, n)
            ran_in = {r.container_id for r in recs if r.container_id}
            return rate, labelled(cluster.tag), len(ran_in)
        for fn in fns:
            await warm(cluster, fn.name, 5)  # every function hot first
        warm_containers = labelled(cluster.tag)
        for _ in range(WARM_BURSTS_MAX):  # then as bench.e2e warms its one function
            await _round_robin(cluster, fns, n)
            before, warm_containers = warm_containers, labelled(cluster.tag)
            if warm_containers == before:
                break
        rates = [(await _round_robin(cluster, fns, n))[0] for _ in range(repeats)]
        return median(rates), warm_containers, labelled(cluster.tag) - warm_containers
    finally:
        await stop(cluster)


async def _round_robin(
    cluster: Cluster, fns: list[Function], n: int
) -> tuple[float, list[CallRecord]]:
    """``n`` calls spread round-robin over ``fns``, pushed at once: calls/s, records."""
    done = await cluster.final_count(APP)
    calls = [c for i in range(n) for c in make_calls(APP, fns[i % len(fns)].name, 1, BODY)]
    t0 = time.perf_counter()
    await cluster.push(calls)
    t1 = await cluster.wait_final(APP, done + n)
    return n / (t1 - t0), await cluster.records([c.id for c in calls])


async def measure(quick: bool) -> Section:
    from tests.rig import RedisServer  # noqa: PLC0415

    n = 300 if quick else 2000
    repeats = 1 if quick else 3
    n_tight = 40 if quick else 100  # every call may need a cold start here
    with tempfile.TemporaryDirectory(prefix="fnq-bench-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp).start()
        try:
            one = await workers_run(tmp, server.url, 1, n, repeats)
            two = await workers_run(tmp, server.url, 2, n, repeats)
            roomy = await functions_run(tmp, server.url, n, tight=False, repeats=repeats)
            tight = await functions_run(tmp, server.url, n_tight, tight=True)
        finally:
            server.stop()
        hosts = await hosts_measure(tmp, n, repeats)
    sec = Section("Scaling: worker processes, hosts and many functions (bench/scaling.py)")
    sec.notes.append(
        f"{n} calls per run of `fnq/echo`, Redis queue, SQLite datastore; worker runs are the "
        f"median of {repeats}. The 10-function run with room for all is warmed as the "
        "worker runs are (5 calls of each function, then bursts of the timed size until "
        "one starts no container, at most three) and timed as the median of "
        f"{repeats}; `containers` is the count after the warm-up. The tight one is a "
        f"single run of {n_tight} calls after 5 calls of one function, since with 10 "
        "functions round-robin over room for 4 containers nearly every call evicts a "
        "container and starts a new one; its `started while timed` counts the distinct "
        "containers its calls ran in, `containers` those left at the end."
    )
    sec.tables.append(
        Table(
            "worker processes",
            ["workers", "calls/s", "vs 1 worker", "containers", "started while timed"],
            [
                ["1", one[0], "1.00x", one[1], one[2]],
                ["2", two[0], f"{two[0] / one[0]:.2f}x", two[1], two[2]],
            ],
        )
    )
    sec.tables.append(
        Table(
            f"{FUNCTIONS} functions, calls round-robin",
            ["memory", "calls/s", "containers", "started while timed", "vs 1 function, 1 worker"],
            [
                [
                    "default (room for all)",
                    roomy[0],
                    roomy[1],
                    roomy[2],
                    f"{roomy[0] / one[0]:.2f}x",
                ],
                [
                    f"room for {TIGHT_CONTAINERS} containers",
                    tight[0],
                    tight[1],
                    tight[2],
                    f"{tight[0] / one[0]:.2f}x",
                ],
            ],
        )
    )
    hosts_report(sec, hosts)
    return sec


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 calls per run")
    run(measure(parser.parse_args().quick)).print()
