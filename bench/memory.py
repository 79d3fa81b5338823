"""Worker memory: RSS with many hot containers, and RSS over many calls.

    .venv/bin/python -m bench.memory            # 100 containers; 100,000 calls (under a minute)
    .venv/bin/python -m bench.memory --quick    # 25 containers; 3,000 calls
    .venv/bin/python -m bench.memory --calls N  # N calls

Same set-up as bench.e2e (one ``fnq worker`` process, Redis queue, SQLite
datastore, ``fnq/echo``). RSS is the worker process's VmRSS.

* hot containers: K functions of 32 MB each get one call each, so K containers
  are started and stay hot (FN_FREEZE_IDLE_MSECS default: they are paused after
  1 s idle); RSS once they are all idle, against RSS of the idle worker.
* many calls: calls in chunks, RSS sampled after each chunk is final; the
  least-squares slope of RSS over calls, in MiB per 10,000 calls.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
from pathlib import Path

from bench._cluster import Cluster, make_calls, stop
from bench._common import Section, Table, label_tag, rss_mb, run, slope
from bench.e2e import APP, BODY, echo, warm

TARGET_RSS_MB = 150.0
FN_MEMORY_MB = 32


async def hot_containers(tmp: Path, redis_url: str, k: int) -> dict[str, float]:
    cluster = Cluster(tmp / "hot", f"{redis_url}?prefix=m{secrets.token_hex(3)}", label_tag())
    try:
        await cluster.open()
        fns = [echo(f"m{i}", memory_mb=FN_MEMORY_MB) for i in range(k)]
        await cluster.register(*fns)
        proc = cluster.start_worker()
        await asyncio.sleep(3)
        idle = rss_mb(proc.pid)
        calls = [make_calls(APP, fn.name, 1, BODY)[0] for fn in fns]
        await cluster.push(calls)
        await cluster.wait_final(APP, k, timeout_s=600)
        recs = await cluster.records([c.id for c in calls])
        containers = len({r.container_id for r in recs if r.container_id})
        await asyncio.sleep(3)  # all idle and paused
        return {"idle": idle, "hot": rss_mb(proc.pid), "containers": containers}
    finally:
        await stop(cluster)


async def many_calls(tmp: Path, redis_url: str, total: int, chunk: int) -> list[tuple[int, float]]:
    cluster = Cluster(tmp / "many", f"{redis_url}?prefix=r{secrets.token_hex(3)}", label_tag())
    try:
        await cluster.open()
        await cluster.register(echo())
        proc = cluster.start_worker()
        await warm(cluster)
        done = await cluster.final_count(APP)
        samples = [(0, rss_mb(proc.pid))]
        for sent in range(chunk, total + 1, chunk):
            await cluster.push(make_calls(APP, "echo", chunk, BODY))
            done += chunk
            await cluster.wait_final(APP, done, timeout_s=600)
            samples.append((sent, rss_mb(proc.pid)))
        return samples
    finally:
        await stop(cluster)


async def measure(quick: bool, calls: int | None = None) -> Section:
    from tests.rig import RedisServer  # noqa: PLC0415

    k = 25 if quick else 100
    total, chunk = (3_000, 500) if quick else (100_000, 5_000)
    if calls is not None:
        total, chunk = calls, max(500, calls // 20)
    with tempfile.TemporaryDirectory(prefix="fnq-bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(tmp).start()
        try:
            hot = await hot_containers(tmp, server.url, k)
            samples = await many_calls(tmp, server.url, total, chunk)
        finally:
            server.stop()
    sec = Section("Worker memory (bench/memory.py)")
    sec.tables.append(
        Table(
            "RSS with hot containers",
            ["state", "containers", "worker RSS (MiB)"],
            [
                ["idle worker", 0, hot["idle"]],
                ["all hot (paused)", int(hot["containers"]), hot["hot"]],
            ],
        )
    )
    sec.check(
        f"worker RSS with {int(hot['containers'])} hot containers",
        f"{hot['hot']:.0f} MiB",
        f"<= {TARGET_RSS_MB:g} MiB",
        hot["hot"] <= TARGET_RSS_MB,
    )
    if k < 100:
        sec.notes.append(f"--quick: {k} containers, not 100; the target is meant for 100.")
    # the first chunks include warm-up growth (caches, pools); fit the slope on the second half
    half = samples[len(samples) // 2 :]
    per_10k = 10_000 * slope([float(c) for c, _ in half], [r for _, r in half])
    sec.tables.append(
        Table(
            f"RSS over {total:,} calls (sampled every {chunk:,})",
            ["calls", "worker RSS (MiB)"],
            [[c, r] for c, r in samples],
        )
    )
    sec.check(
        "RSS slope, second half of the run",
        f"{per_10k:+.2f} MiB/10k",
        "about 0",
        abs(per_10k) < 1.0,
    )
    sec.notes.append(f"{total:,} calls; slope fitted on the second half of the samples.")
    if total < 100_000:
        sec.notes.append(f"{total:,} calls, not 100,000: the growth target is meant for 100,000.")
    return sec


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="25 containers; 3,000 calls")
    parser.add_argument("--calls", type=int, help="calls in the many-calls run (in 20 chunks)")
    args = parser.parse_args()
    sec = run(measure(args.quick, args.calls))
    sec.print()
    print("\n" + sec.markdown())
