"""RQ interop throughput: RQQueue's reserve + complete beside RQ's own worker
and beside fnq's native Redis queue (reserve + ack), in the same run.

    .venv/bin/python -m bench.rq                 # 5,000 jobs per run
    .venv/bin/python -m bench.rq --quick         # 1,000 jobs per run, well under a minute
    .venv/bin/python -m bench.rq --redis-url redis://127.0.0.1:6379/9   # FLUSHES that DB

Without --redis-url a throwaway redis-server is started (tests.rig). Jobs are
enqueued with rq (``serializer="json"``, ``enqueue_many`` in pipelines of 100)
before each timed run; only the consuming side is timed.

Runs:

* fnq reserve+complete 1   ``reserve`` then ``complete`` (success), one job at a time
* fnq reserve+complete x20 ``reserve_many(20)``, then the 20 ``complete`` calls at once
* native redis            fnq's own Redis Streams queue: ``reserve``/``reserve_many(20)``
                           then ``ack``/``ack_many`` (no rq records to write)
* rq SimpleWorker          ``SimpleWorker.work(burst=True)`` running a no-op job:
                           RQ's own dequeue, STARTED, execute, FINISHED + Result

Both sides write the same rq records per job (status, StartedJobRegistry
execution, Result stream, FinishedJobRegistry); the fnq adapter adds its
reservation and the JSON parse of the job.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from redis import Redis
from rq import Queue, SimpleWorker
from rq.registry import FinishedJobRegistry

from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from config.settings import load_settings
from mq.base import open_queue
from mq.rq import open_rq_queues

BATCH = 100
NOOP = "bench.rq.noop"


def noop(**_: object) -> str:
    return "ok"


def fill(conn: Redis, n: int, func: str) -> None:
    conn.flushdb()
    queue = Queue("default", connection=conn, serializer="json")
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        data = [
            Queue.prepare_data(func, kwargs={"app": "bench", "fn": "echo", "body": str(i)})
            for i in range(size)
        ]
        queue.enqueue_many(data)


async def fnq_run(url: str, conn: Redis, n: int, batch: int) -> float:
    await asyncio.to_thread(fill, conn, n, "fnq.call")
    queue = open_rq_queues(url, ["default"], load_settings())
    outcome = Outcome(CallStatus.SUCCESS, response=Response(200, {}, b"ok"))
    done = 0
    start = time.perf_counter()
    try:
        while done < n:
            msgs = await queue.reserve_many(batch, 1.0)
            if not msgs:
                raise RuntimeError(f"queue ran dry after {done} of {n} jobs")
            if batch == 1:
                await queue.complete(msgs[0], outcome)
            else:
                await asyncio.gather(*(queue.complete(m, outcome) for m in msgs))
            done += len(msgs)
        return time.perf_counter() - start
    finally:
        finished = FinishedJobRegistry("default", connection=conn).count
        await queue.close()
        if finished != n:
            raise RuntimeError(f"{finished} of {n} jobs finished in rq")


async def native_run(url: str, conn: Redis, n: int, batch: int) -> float:
    """The same consuming work on fnq's own Redis queue: reserve, then ack."""
    await asyncio.to_thread(conn.flushdb)
    settings = load_settings()
    queue = open_queue(f"{url}?prefix=benchrq", settings)
    try:
        calls = [Call(id=new_call_id(), app="bench", fn="echo", body=str(i).encode())
                 for i in range(n)]  # fmt: skip
        for first in range(0, n, BATCH):
            await queue.push_many(calls[first : first + BATCH])
        done = 0
        start = time.perf_counter()
        while done < n:
            msgs = await queue.reserve_many(batch, 1.0)
            if not msgs:
                raise RuntimeError(f"queue ran dry after {done} of {n} messages")
            if batch == 1:
                await queue.ack(msgs[0])
            else:
                await queue.ack_many(msgs)
            done += len(msgs)
        return time.perf_counter() - start
    finally:
        await queue.close()


def rq_run(conn: Redis, n: int) -> float:
    fill(conn, n, NOOP)
    queue = Queue("default", connection=conn, serializer="json")
    worker = SimpleWorker([queue], connection=conn, serializer="json")
    start = time.perf_counter()
    worker.work(burst=True, logging_level="WARNING")
    elapsed = time.perf_counter() - start
    finished = FinishedJobRegistry("default", connection=conn).count
    if finished != n:
        raise RuntimeError(f"rq finished {finished} of {n} jobs")
    return elapsed


def main(args: argparse.Namespace) -> None:
    n = 1_000 if args.quick else args.jobs
    logging.getLogger("rq").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.redis_url
        if not url:
            from tests.rig import RedisServer  # noqa: PLC0415

            server = RedisServer(Path(tmp)).start()
            url = f"redis://127.0.0.1:{server.port}/9"
        conn = Redis.from_url(url)
        try:
            rows = [
                ("fnq reserve+complete 1", asyncio.run(fnq_run(url, conn, n, 1))),
                ("fnq reserve+complete x20", asyncio.run(fnq_run(url, conn, n, 20))),
                ("native redis reserve+ack 1", asyncio.run(native_run(url, conn, n, 1))),
                ("native redis reserve+ack x20", asyncio.run(native_run(url, conn, n, 20))),
                # rq installs signal handlers: it must run on the main thread, no loop.
                ("rq SimpleWorker (no-op)", rq_run(conn, n)),
            ]
        finally:
            conn.flushdb()
            conn.close()
            if server is not None:
                server.stop()
    base = n / rows[-1][1]
    print(f"{n} jobs per run\n")
    print(f"{'run':28} {'jobs/s':>10} {'vs rq':>8}")
    for what, seconds in rows:
        rate = n / seconds
        print(f"{what:28} {rate:10.0f} {rate / base:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 jobs per run")
    parser.add_argument("--jobs", type=int, default=5_000, help="jobs per run")
    parser.add_argument("--redis-url", default="", help="an existing Redis (its DB is flushed)")
    main(parser.parse_args())
