"""End to end: calls pushed to Redis, run by ``fnq worker`` in a hot container, recorded.

    .venv/bin/python -m bench.e2e            # 2,000 calls per run, 3 repeats
    .venv/bin/python -m bench.e2e --quick    # 300 calls per run, 1 repeat

One ``fnq worker`` subprocess (FN_MQ_URL=redis://...?prefix=..., SQLite
datastore in a temporary FN_DATA_DIR, default settings otherwise) runs the echo
FDK function (``fnq/echo``); every call's record, response and log are written.
A throwaway redis-server (tests.rig) holds the queue.

Throughput: N calls pushed at once (push_many, batches of 100); calls/s from the
first push until the datastore counts N final records. The worker is warmed
first: a few calls, then bursts of N until one starts no container (at most
three), so that the timed bursts find the containers a burst leads the worker
to (the report says how many, and any started during the timed bursts).
Baselines, same machine, same run:

* (a) RQ ``SimpleWorker`` running no-op jobs from the same redis-server
      (enqueue_many, then ``work(burst=True)``; first enqueue to last job);
* (b) RQ ``SimpleWorker`` whose job is a ``docker run --rm -d`` of the same image
      with the socket mounted, one call, removal (bench._common), fewer jobs;
* (c) the ceiling: a raw HTTP client on hot containers of the same image started
      by a DockerDriver in this process (one client per container, 1 and 2
      containers, the better one).

CPU per call (bench._cpu) is counted over the timed runs of fnq and of (c), by
party: worker, redis-server, containers, producer or raw client.

Latency: a paced producer pushes one call at a time at 25 %, 50 % and 75 % of
the measured throughput, each load for 5 s as many times as the throughput
repeats, the loads in turns (a column is the median of the runs' own values,
so one run's container start does not decide the p99); per call, latency =
record ``updated_at`` (when the worker wrote the final record) - the call's
``created_at`` as the producer made it, just before its push. The record's own
``created_at`` is not used: the wire carries whole milliseconds, so it is up to
1 ms early (0.5 ms on average).
Overhead = latency - the function's time, taken three ways: the record's
``completed_at - started_at`` (what the agent saw, so this is queue + datastore
+ scheduling); the raw client's median latency when it calls the same function
at the same pace (everything but the function; the target is checked on this
one); and the raw client's back-to-back median latency. On a host whose CPUs
idle between calls, a call after a gap takes longer than one right after
another (the wake-up of an idle CPU), for any client: the paced raw call
measures that, so it is not counted as the worker's. Meanwhile a probe process
(bench._steady) times a fixed bit of work every few ms; the table gives each
run's share of windows in which the host's CPUs ran slow, for every party at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench._cluster import Cluster, stop
from bench._common import (
    Section,
    Table,
    bench_settings,
    docker_run_one_call,
    label_tag,
    labelled,
    median,
    no_gc,
    percentile,
    raw_calls,
    raw_throughput,
    remove_labelled,
    run,
)
from bench._cpu import CpuWatch
from bench._steady import SLOW_FACTOR, WINDOW_S, SteadyProbe
from config.domain import Call, Function, new_call_id
from mq.producer import enqueue_async
from mq.redis_url import open_client
from worker.agent.driver import ContainerSpec
from worker.agent.drivers.docker import DockerDriver

APP = "bench"
IMAGE = "fnq/echo"
BODY = b'{"name": "bench"}'
NOOP = "bench.mq.noop"
DOCKER_JOB = "bench.e2e.docker_run_job"
TARGETS = {"a": 5.0, "b": 300.0, "c": 0.50}
WARM_BURSTS_MAX = 3
SHARES = (0.25, 0.5, 0.75)  # of the best burst's calls/s, for the paced latency runs
XADD_SHARE = 0.25  # also paced with the documented one-command push (XADD), routed by the worker


@dataclass
class Loads:
    """The paced runs: per load share, each run's (latency s, function s) per call,
    and how many containers were started during that share's runs."""

    runs: dict[float, list[list[tuple[float, float]]]]
    starts: dict[float, int]
    seconds: float  # each run's length
    xadd: list[list[tuple[float, float]]]  # XADD_SHARE, pushed as producers' XADDs
    xadd_starts: int
    # Per run, the share of its windows in which the host's CPUs ran slow (bench._steady)
    slow: dict[float, list[float]]
    xadd_slow: list[float]
    probe_realtime: bool


OVERHEAD_P50_MS, OVERHEAD_P99_MS = 2.0, 10.0


def echo(name: str = "echo", memory_mb: int = 128) -> Function:
    return Function(app=APP, name=name, image=IMAGE, memory_mb=memory_mb)


def docker_run_job(image: str, body: bytes) -> float:
    """What an RQ job does in baseline (b): one call in a fresh container."""
    return docker_run_one_call(image, body)[1]


# --------------------------------------------------------------------- fnq


async def fnq_throughput(
    cluster: Cluster, n: int, repeats: int, watch: CpuWatch | None = None
) -> list[float]:
    """Calls/s of each repeat (the cluster's workers are running and warm); ``watch``
    counts the CPU of the repeats."""
    rates = []
    done = await cluster.final_count(APP)
    for _ in range(repeats):
        with no_gc():
            if watch is not None:
                watch.start()
            seconds = await cluster.run_calls(APP, "echo", n, BODY, done)
            if watch is not None:
                watch.stop(n)
        done += n
        rates.append(n / seconds)
        await asyncio.sleep(0.5)
    return rates


async def warm(cluster: Cluster, fn: str = "echo", n: int = 20) -> None:
    done = await cluster.final_count(APP)
    await cluster.run_calls(APP, fn, n, BODY, done)


async def warm_bursts(cluster: Cluster, n: int) -> int:
    """Bursts of ``n`` calls until one starts no container (at most WARM_BURSTS_MAX);
    returns how many containers there are then.

    A burst leads the worker to start a few more containers of the function
    than the one its first calls found (each start a few hundred ms of CPU):
    the timed bursts measure the worker once it has them.
    """
    await warm(cluster)
    count = labelled(cluster.tag)
    for _ in range(WARM_BURSTS_MAX):
        await fnq_throughput(cluster, n, 1)
        before, count = count, labelled(cluster.tag)
        if count == before:
            break
    return count


async def paced(
    cluster: Cluster,
    rate: float,
    seconds: float,
    xadd: bool = False,
    span: list[float] | None = None,
) -> list[tuple[float, float]]:
    """Push one call every 1/rate s for ``seconds``; (latency s, function s) per call.
    Pushed with the queue's own script, as ``fnq call`` does, or with ``xadd`` as
    producers do (mq.producer: one XADD, which the worker routes). ``span`` gets the
    time.monotonic() of the first push and of the last call's final record."""
    n = max(20, int(rate * seconds))
    done = await cluster.final_count(APP)
    queue = cluster.queue
    assert queue is not None
    client, prefix, _ = open_client(cluster.mq_url, 10.0)
    loop = asyncio.get_running_loop()
    calls = []
    try:
        await client.ping()  # connected before the timed pushes
        with no_gc():
            if span is not None:
                span.append(time.monotonic())
            start = loop.time()
            for i in range(n):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                call = Call(new_call_id(), APP, "echo", BODY)  # created_at: now
                calls.append(call)
                if xadd:
                    await enqueue_async(client, APP, "echo", BODY, call_id=call.id, prefix=prefix)
                else:
                    await queue.push(call)
            await cluster.wait_final(APP, done + n)
            if span is not None:
                span.append(time.monotonic())
    finally:
        await client.aclose()
    made = {c.id: c.created_at for c in calls}  # to the microsecond: the wire rounds it
    out = []
    for rec in await cluster.records([c.id for c in calls]):
        if rec.started_at is None or rec.completed_at is None:
            continue
        out.append(
            (
                (rec.updated_at - made[rec.id]).total_seconds(),
                (rec.completed_at - rec.started_at).total_seconds(),
            )
        )
    return out


async def latency_runs(
    cluster: Cluster, best: float, repeats: int, seconds: float, tmp: Path
) -> Loads:
    """Each share of ``best`` paced ``repeats`` times for ``seconds``, the loads in turns
    (each load's runs spread over the minute), the host's steadiness probed meanwhile."""
    runs: dict[float, list[list[tuple[float, float]]]] = {s: [] for s in SHARES}
    starts = dict.fromkeys(SHARES, 0)
    spans: dict[float, list[list[float]]] = {s: [] for s in SHARES}
    xadd: list[list[tuple[float, float]]] = []
    xadd_spans: list[list[float]] = []
    xadd_starts = 0
    probe = SteadyProbe(tmp / "steady.bin").start()
    try:
        for _ in range(repeats):
            for share in SHARES:
                before = labelled(cluster.tag)
                spans[share].append([])
                span = spans[share][-1]
                runs[share].append(await paced(cluster, best * share, seconds, span=span))
                starts[share] += labelled(cluster.tag) - before
            before = labelled(cluster.tag)
            xadd_spans.append([])
            rate = best * XADD_SHARE
            xadd.append(await paced(cluster, rate, seconds, xadd=True, span=xadd_spans[-1]))
            xadd_starts += labelled(cluster.tag) - before
    finally:
        probe.stop()
    return Loads(
        runs,
        starts,
        seconds,
        xadd,
        xadd_starts,
        {s: [probe.slow_share(*span) for span in spans[s]] for s in SHARES},
        [probe.slow_share(*span) for span in xadd_spans],
        probe.realtime,
    )


# -------------------------------------------------------------- baselines


def rq_noop(redis_url: str, n: int) -> float:
    import redis  # noqa: PLC0415
    from rq import Queue, SimpleWorker  # noqa: PLC0415

    conn = redis.Redis.from_url(redis_url)
    queue = Queue(f"bench-{secrets.token_hex(3)}", connection=conn)
    try:
        t0 = time.perf_counter()
        for start in range(0, n, 100):
            with conn.pipeline() as pipe:
                jobs = [Queue.prepare_data(NOOP, (i,)) for i in range(start, min(n, start + 100))]
                queue.enqueue_many(jobs, pipeline=pipe)
                pipe.execute()
        SimpleWorker([queue], connection=conn).work(burst=True, logging_level="WARNING")
        seconds = time.perf_counter() - t0
        if queue.finished_job_registry.count < n:
            raise RuntimeError(f"RQ finished {queue.finished_job_registry.count} of {n} jobs")
        return n / seconds
    finally:
        queue.empty()  # type: ignore[no-untyped-call]
        conn.close()


def rq_docker_run(redis_url: str, n: int) -> float:
    import redis  # noqa: PLC0415
    from rq import Queue, SimpleWorker  # noqa: PLC0415

    conn = redis.Redis.from_url(redis_url)
    queue = Queue(f"bench-{secrets.token_hex(3)}", connection=conn, default_timeout=120)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            queue.enqueue(DOCKER_JOB, IMAGE, BODY)
        SimpleWorker([queue], connection=conn).work(burst=True, logging_level="WARNING")
        seconds = time.perf_counter() - t0
        if queue.finished_job_registry.count < n:
            raise RuntimeError(f"RQ finished {queue.finished_job_registry.count} of {n} jobs")
        return n / seconds
    finally:
        queue.empty()  # type: ignore[no-untyped-call]
        conn.close()


@dataclass
class Raw:
    """The raw client's numbers: calls/s on 1 and 2 containers, its median latency (ms)
    back to back and at each paced load share, and the CPU of its 1 and 2 container
    runs."""

    one: float
    two: float
    latency_ms: float
    paced_ms: dict[float, float]
    cpu: dict[int, CpuWatch]


async def raw_ceiling(tmp: Path, n: int, repeats: int, paces: dict[float, float]) -> Raw:
    """The raw client on 1 and 2 hot echo containers, and at each of ``paces`` (load
    share -> calls/s) on one."""
    tag = label_tag()
    settings = bench_settings(tmp / "raw", tag)
    driver = DockerDriver(settings)
    await driver.start()
    try:
        sockets = []
        for i in range(2):
            spec = ContainerSpec(f"{tag}-raw{i}", IMAGE, APP, "echo", memory_mb=128)
            container = await driver.create(spec)
            await container.start()
            sockets.append(str(container.iofs.socket_path))
        await raw_throughput(sockets, 50, BODY)
        one, two, lat = [], [], []
        cpu = {k: CpuWatch(own_party="client", container_tag=tag) for k in (1, 2)}
        for _ in range(repeats):
            with no_gc():
                cpu[1].start()
                rate, ms = await raw_throughput(sockets[:1], n, BODY)
                cpu[1].stop(n)
            one.append(rate)
            lat.append(ms)
            with no_gc():
                cpu[2].start()
                two.append((await raw_throughput(sockets, n // 2, BODY))[0])
                cpu[2].stop(n // 2 * 2)
        for watch in cpu.values():
            watch.close()
        paced_ms = {}
        for share, rate in paces.items():
            with no_gc():
                paced_lat = await raw_calls(sockets[0], max(200, int(rate)), BODY, rate)
            paced_ms[share] = 1000 * median(paced_lat)
        return Raw(median(one), median(two), median(lat), paced_ms, cpu)
    finally:
        await driver.close()
        remove_labelled(tag)


# ------------------------------------------------------------------ run all


async def measure(quick: bool) -> Section:
    from tests.rig import RedisServer  # noqa: PLC0415

    n = 300 if quick else 2000
    repeats = 1 if quick else 3
    docker_jobs = 5 if quick else 20
    with tempfile.TemporaryDirectory(prefix="fnq-bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp).start()
        cluster = Cluster(tmp / "c1", f"{server.url}?prefix=b{secrets.token_hex(3)}", label_tag())
        try:
            await cluster.open()
            await cluster.register(echo())
            cluster.start_worker()
            warm_containers = await warm_bursts(cluster, n)
            redis_pid = server.proc.pid if server.proc is not None else -1
            fnq_cpu = CpuWatch(
                processes={
                    "worker": lambda: [p.pid for p in cluster.procs],
                    "redis-server": lambda: [redis_pid],
                },
                own_party="producer",
                container_tag=cluster.tag,
            )
            fnq = await fnq_throughput(cluster, n, repeats, fnq_cpu)
            fnq_cpu.close()
            containers = (warm_containers, labelled(cluster.tag) - warm_containers)
            best = max(fnq)
            loads = await latency_runs(cluster, best, repeats, 2.0 if quick else 5.0, tmp)
        finally:
            await stop(cluster)
        raw = await raw_ceiling(tmp, n, repeats, {share: best * share for share in loads.runs})
        rq_a = [rq_noop(server.url, n) for _ in range(repeats)]  # RQ wants the main thread
        rq_b = rq_docker_run(server.url, docker_jobs)
        server.stop()
    return report(
        n,
        repeats,
        median(fnq),
        best,
        loads,
        raw,
        fnq_cpu,
        median(rq_a),
        rq_b,
        docker_jobs,
        containers,
    )


def report(
    n: int,
    repeats: int,
    fnq: float,
    best: float,
    loads: Loads,
    raw: Raw,
    fnq_cpu: CpuWatch,
    rq_a: float,
    rq_b: float,
    docker_jobs: int,
    containers: tuple[int, int],
) -> Section:
    sec = Section("End to end: Redis -> fnq worker -> hot container -> SQLite (bench/e2e.py)")
    ceiling = max(raw.one, raw.two)
    sec.notes.append(
        f"{n} calls of `{IMAGE}` per run, median of {repeats} run(s); one `fnq worker` "
        "process with default settings, SQLite datastore (WAL, synchronous=FULL), records, "
        "responses and logs written. Baseline (b) ran "
        f"{docker_jobs} jobs and its rate is extrapolated. The worker was warmed with bursts "
        f"of the same size until one started no container (at most {WARM_BURSTS_MAX}): "
        f"{containers[0]} container(s) of the function then"
        + (f"; {containers[1]} more started during the timed runs." if containers[1] else ".")
    )
    rows = [
        ["fnq worker (1 process)", fnq, "", ""],
        ["(a) RQ SimpleWorker, no-op jobs", rq_a, fnq / rq_a, f">= {TARGETS['a']:g}x"],
        ["(b) RQ + docker run per job", rq_b, fnq / rq_b, f">= {TARGETS['b']:g}x"],
        ["(c) raw client, 1 container", raw.one, fnq / raw.one, ""],
        ["(c) raw client, 2 containers", raw.two, fnq / raw.two, ""],
    ]
    sec.tables.append(Table("throughput", ["run", "calls/s", "fnq / run", "target"], rows))
    sec.check("fnq / (a) RQ no-op", f"{fnq / rq_a:.1f}x", ">= 5x", fnq / rq_a >= TARGETS["a"])
    sec.check(
        "fnq / (b) RQ + docker run", f"{fnq / rq_b:.0f}x", ">= 300x", fnq / rq_b >= TARGETS["b"]
    )
    sec.check(
        "fnq / (c) raw ceiling", f"{fnq / ceiling:.0%}", ">= 50%", fnq / ceiling >= TARGETS["c"]
    )

    sec.tables.append(_cpu_table(fnq, fnq_cpu, raw))
    sec.notes.append(
        "CPU per call: each party's user + system time over the timed runs (the worker "
        "process with all its threads, redis-server, the function's containers from their "
        "cgroups, this process as producer or raw client) divided by the calls. "
        "`host CPUs busy` is the whole host's share over those runs. `CPUs / sum` is the "
        "rate at which that much work per call would keep every CPU of this host busy: "
        "where the host is the limit, fnq / (c) cannot pass the ratio of the two `CPUs / "
        "sum` columns."
    )
    raw_ms = raw.latency_ms
    lat_rows = []
    rounds = [(share, f"{share:.0%} ({best * share:,.0f}/s)", runs, loads.starts[share],
               loads.slow[share]) for share, runs in loads.runs.items()]  # fmt: skip
    label = f"{XADD_SHARE:.0%} ({best * XADD_SHARE:,.0f}/s), XADD"
    rounds.append((XADD_SHARE, label, loads.xadd, loads.xadd_starts, loads.xadd_slow))
    for share, label, runs, started, slow in rounds:
        paced_ms = raw.paced_ms[share]
        per_run = [_run_stats(samples, paced_ms, raw_ms) for samples in runs]

        def mid(key: str, per_run: list[dict[str, float]] = per_run) -> float:
            return median([stats[key] for stats in per_run])

        lat_rows.append(
            [
                label,
                sum(len(samples) for samples in runs),
                mid("p50"),
                mid("p99"),
                mid("rec p50"),
                mid("rec p99"),
                paced_ms,
                mid("raw p50"),
                mid("raw p99"),
                " / ".join(f"{stats['raw p99']:.1f}" for stats in per_run),
                mid("b2b p50"),
                started,
                " / ".join(f"{part:.0%}" for part in slow),
            ]
        )
        if share == 0.5:
            p50, p99 = mid("raw p50"), mid("raw p99")
            sec.check(
                "overhead p50 at 50 % load (vs raw at that pace)",
                f"{p50:.2f} ms",
                f"<= {OVERHEAD_P50_MS:g} ms",
                p50 <= OVERHEAD_P50_MS,
            )
            sec.check(
                "overhead p99 at 50 % load (vs raw at that pace)",
                f"{p99:.2f} ms",
                f"<= {OVERHEAD_P99_MS:g} ms",
                p99 <= OVERHEAD_P99_MS,
            )
    sec.tables.append(
        Table(
            f"latency, enqueue -> final record (ms); raw call back to back = {raw_ms:.2f} ms",
            [
                "load (of best run)",
                "calls",
                "p50",
                "p99",
                "over rec p50",
                "over rec p99",
                "raw call at pace",
                "over raw p50",
                "over raw p99",
                "over raw p99, each run",
                "over b2b raw p50",
                "containers started",
                "host slow windows, each run",
            ],
            lat_rows,
        )
    )
    sec.notes.append(
        f"Each load ran {len(next(iter(loads.runs.values())))} time(s) for {loads.seconds:g} s, "
        "the loads in turns; a column is the median of the runs' own values (p99 of each "
        "run, then their median), `calls` their total. `containers started` counts the "
        "worker's container starts during that load's runs: a start takes CPU from the "
        "calls of its time, which shows in that run's p99. The producer pushes each call "
        "with the queue's own script, as `fnq call` does, but in the `XADD` row: there it "
        "pushes as producers do with any Redis client (mq.producer, one XADD to the "
        "producers' stream), and the worker routes the entry before it runs the call."
    )
    sec.notes.append(
        "Latency starts at the call's `created_at` as the producer made it, just before "
        "its push (the record's own is whole milliseconds, as the wire carries it). "
        "`over rec` = latency - the record's completed_at - started_at (queue, scheduling, "
        "datastore); `over raw` = latency - the raw client's median call on a hot echo "
        "container at the same pace, one call every 1/rate s (everything the worker adds, "
        "including its own HTTP client and log capture); `over b2b raw` subtracts the raw "
        "client's back-to-back call instead. This host answers slower after an idle gap "
        "(the raw call's `at pace` column against the back-to-back one): that is the "
        "function's time at that load, not the worker's. The final record's "
        "time is its `updated_at`, taken when the worker hands it to the datastore's group "
        "commit, so the commit itself (a few ms with SQLite FULL) is not in the latency."
    )
    sec.notes.append(
        "`host slow windows`: while the paced runs went on, a probe process "
        + (
            "under the real-time policy SCHED_FIFO, which no other task of this host delays, "
            if loads.probe_realtime
            else "(not allowed the real-time policy here, so it also "
            "waits for the host's own tasks) "
        )
        + f"timed a fixed bit of work every few ms (bench/_steady.py). A {WINDOW_S * 1000:g} ms "
        f"window counts as slow when that work took at least {SLOW_FACTOR:g} times its best "
        "there: the CPUs themselves gave less, for every party at once (on a shared VM, the "
        "hypervisor may give its CPUs to others). Calls keep arriving at the same pace through "
        "such a window, so they pile up and drain after it: compare each run's share with "
        "its p99."
    )
    sec.notes.append(
        "The producer and the raw client are this process; its garbage collector is "
        "paused over each timed run (collected before). This process holds the calls and "
        "records of the runs before, and a full collection stopped the producer for "
        "37-61 ms: it then pushed the calls it owed at once, and that burst made the p99."
    )
    return sec


CPU_PARTIES = ("worker", "client", "containers", "redis-server", "producer")


def _cpu_table(fnq: float, fnq_cpu: CpuWatch, raw: Raw) -> Table:
    """CPU per call by party in the timed throughput runs, and the calls/s the host's
    CPUs would allow at that cost if nothing else ran."""
    cpus = os.cpu_count() or 1
    rows = []
    runs = [("fnq worker", fnq, fnq_cpu), ("(c) raw client, 1 container", raw.one, raw.cpu[1])]
    runs.append(("(c) raw client, 2 containers", raw.two, raw.cpu[2]))
    for name, rate, watch in runs:
        per_call = watch.per_call_ms()
        total = sum(per_call.values())
        cells: list[object] = [name, rate]
        cells += [round(1000 * per_call[k]) if k in per_call else "" for k in CPU_PARTIES]
        cells += [round(1000 * total), f"{watch.host_busy():.0%}"]
        cells.append(cpus / (total / 1000) if total else "")
        rows.append(cells)
    return Table(
        f"CPU per call in the timed runs (us); this host has {cpus} CPU(s)",
        ["run", "calls/s", *CPU_PARTIES, "sum", "host CPUs busy", "CPUs / sum (calls/s)"],
        rows,
    )


def _run_stats(
    samples: list[tuple[float, float]], paced_ms: float, raw_ms: float
) -> dict[str, float]:
    """One paced run's percentiles (ms): latency, and the three overheads."""
    lat = [1000 * a for a, _ in samples]
    over_rec = [1000 * (a - b) for a, b in samples]
    over_paced = [x - paced_ms for x in lat]
    return {
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "rec p50": percentile(over_rec, 50),
        "rec p99": percentile(over_rec, 99),
        "raw p50": percentile(over_paced, 50),
        "raw p99": percentile(over_paced, 99),
        "b2b p50": percentile(lat, 50) - raw_ms,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 calls per run, 1 repeat")
    run(measure(parser.parse_args().quick)).print()
