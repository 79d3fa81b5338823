"""Queue throughput: push, reserve and ack on each backend, beside RQ on the same redis-server.

    .venv/bin/python -m bench.mq                    # 20,000 messages per run
    .venv/bin/python -m bench.mq --quick            # 3,000 messages, under a minute
    .venv/bin/python -m bench.mq --redis-url redis://127.0.0.1:6379/0

Without --redis-url a throwaway redis-server is started (tests.rig: no RDB
snapshots, no AOF). SQLite runs on a temporary file with WAL and
synchronous=NORMAL. Every run happens in this process except the four-consumer
runs, whose consumers are separate processes (as workers would be).

Runs, per backend:

* push 1-by-1      ``push`` awaited once per message
* push_many        batches of 100
* reserve+ack 1    ``reserve`` then ``ack``, one message at a time
* reserve+ack x100 ``reserve_many(100)`` then ``ack_many``
* end-to-end 1c    one producer (push_many) and one consumer (reserve_many + ack_many)
                   at the same time; rate = messages / (first push .. last ack)
* end-to-end 4c    the same with four consumer processes

RQ's baseline: ``Queue.enqueue`` one by one, ``enqueue_many`` in pipelines of
100, and ``Queue.dequeue_any`` one by one (RQ has no acknowledgement: a job is
gone from the queue once dequeued, so its dequeue is compared with our
reserve + ack).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from config.domain import Call, new_call_id
from config.settings import load_settings
from mq.base import MessageQueue, open_queue

BATCH = 100
NOOP = "bench.mq.noop"  # RQ will not take functions of __main__ by reference


@dataclass
class Run:
    backend: str
    what: str
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


def calls(n: int) -> list[Call]:
    return [Call(new_call_id(), "bench", "noop", b'{"n": %d}' % i) for i in range(n)]


def noop(n: int) -> int:  # what the RQ jobs would run
    return n


async def timed(work: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await work()
    return time.perf_counter() - t0


# ------------------------------------------------------------------- fnq runs


async def single_runs(url: str, backend: str, n: int) -> list[Run]:
    settings = load_settings()
    q = open_queue(url, settings)
    try:
        await q.dead_purge()
        out: list[Run] = []
        one_n = max(n // 5, 200)
        batch = calls(one_n)

        async def push_one() -> None:
            for c in batch:
                await q.push(c)

        out.append(Run(backend, "push 1-by-1", one_n, await timed(push_one)))

        async def take_one() -> None:
            for _ in range(one_n):
                msg = await q.reserve(1.0)
                assert msg is not None
                await q.ack(msg)

        out.append(Run(backend, "reserve+ack 1", one_n, await timed(take_one)))

        many = calls(n)

        async def push_many() -> None:
            for i in range(0, n, BATCH):
                await q.push_many(many[i : i + BATCH])

        out.append(Run(backend, "push_many x100", n, await timed(push_many)))

        async def take_many() -> None:
            left = n
            while left:
                msgs = await q.reserve_many(BATCH, 1.0)
                assert msgs
                await q.ack_many(msgs)
                left -= len(msgs)

        out.append(Run(backend, "reserve+ack x100", n, await timed(take_many)))
        out.append(Run(backend, "end-to-end 1c", n, await end_to_end(q, q, n)))
        return out
    finally:
        await q.close()


async def end_to_end(producer: MessageQueue, consumer: MessageQueue, n: int) -> float:
    many = calls(n)

    async def produce() -> None:
        for i in range(0, n, BATCH):
            await producer.push_many(many[i : i + BATCH])

    async def consume() -> None:
        left = n
        while left:
            msgs = await consumer.reserve_many(BATCH, 5.0)
            assert msgs, "messages went missing"
            await consumer.ack_many(msgs)
            left -= len(msgs)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce())
        tg.create_task(consume())
    return time.perf_counter() - t0


def _consumer_process(
    url: str, total: int, done: Synchronized[int], ready: Any, start: Any, finished: Any
) -> None:
    async def run() -> None:
        q = open_queue(url, load_settings())
        try:
            await q.stats()
            ready.release()
            await asyncio.to_thread(start.wait)
            while done.value < total:
                msgs = await q.reserve_many(BATCH, 0.05)
                if msgs:
                    await q.ack_many(msgs)
                    with done.get_lock():
                        done.value += len(msgs)
                        if done.value >= total:
                            finished.set()
        finally:
            await q.close()

    asyncio.run(run())


async def four_consumers(url: str, backend: str, n: int) -> Run:
    ctx = mp.get_context("spawn")
    done = ctx.Value("q", 0)
    ready, start, finished = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    procs = [
        ctx.Process(target=_consumer_process, args=(url, n, done, ready, start, finished))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        await asyncio.to_thread(ready.acquire, True, 60)
    q = open_queue(url, load_settings())
    try:
        many = calls(n)
        start.set()
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            await q.push_many(many[i : i + BATCH])
        if not await asyncio.to_thread(finished.wait, 120):
            raise RuntimeError(f"only {done.value} of {n} messages came through")
        seconds = time.perf_counter() - t0
    finally:
        await q.close()
        for p in procs:
            await asyncio.to_thread(p.join, 10)
    return Run(backend, "end-to-end 4c", n, seconds)


# -------------------------------------------------------------------- RQ runs


def rq_runs(redis_url: str, n: int) -> list[Run]:
    import redis  # noqa: PLC0415
    from rq import Queue  # noqa: PLC0415

    conn = redis.Redis.from_url(redis_url)
    queue = Queue("fnq-bench", connection=conn)
    queue.empty()  # type: ignore[no-untyped-call]
    out = []
    one_n = max(n // 5, 200)
    t0 = time.perf_counter()
    for i in range(one_n):
        queue.enqueue(NOOP, i)
    out.append(Run("rq", "enqueue 1-by-1", one_n, time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(one_n):
        assert Queue.dequeue_any([queue], None, connection=conn) is not None
    out.append(Run("rq", "dequeue 1-by-1", one_n, time.perf_counter() - t0))
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        with conn.pipeline() as pipe:
            jobs = [Queue.prepare_data(NOOP, (i,)) for i in range(start, min(n, start + BATCH))]
            queue.enqueue_many(jobs, pipeline=pipe)
            pipe.execute()
    out.append(Run("rq", "enqueue_many x100", n, time.perf_counter() - t0))
    queue.empty()  # type: ignore[no-untyped-call]
    conn.close()
    return out


# --------------------------------------------------------------------- report


def report(runs: list[Run]) -> None:
    print(f"\n{'backend':<8} {'run':<18} {'messages':>9} {'seconds':>9} {'msgs/s':>10}")
    for r in runs:
        print(f"{r.backend:<8} {r.what:<18} {r.messages:>9} {r.seconds:>9.3f} {r.rate:>10,.0f}")
    rate = {(r.backend, r.what): r.rate for r in runs}
    pairs = [
        (
            "redis push 1-by-1 / rq enqueue 1-by-1",
            ("redis", "push 1-by-1"),
            ("rq", "enqueue 1-by-1"),
        ),
        (
            "redis push_many / rq enqueue_many",
            ("redis", "push_many x100"),
            ("rq", "enqueue_many x100"),
        ),
        (
            "redis reserve+ack 1 / rq dequeue 1",
            ("redis", "reserve+ack 1"),
            ("rq", "dequeue 1-by-1"),
        ),
        ("redis end-to-end 4c / 1c", ("redis", "end-to-end 4c"), ("redis", "end-to-end 1c")),
        ("sqlite end-to-end 4c / 1c", ("sqlite", "end-to-end 4c"), ("sqlite", "end-to-end 1c")),
        ("redis / sqlite end-to-end 1c", ("redis", "end-to-end 1c"), ("sqlite", "end-to-end 1c")),
    ]
    print("\nratios (measured in this run)")
    for label, a, b in pairs:
        if a in rate and b in rate:
            print(f"  {label:<40} {rate[a] / rate[b]:6.2f}x")
    targets = [("redis", 10_000), ("sqlite", 2_000)]
    print("\nend-to-end targets (push -> reserve -> ack)")
    for backend, target in targets:
        best = max(rate.get((backend, w), 0.0) for w in ("end-to-end 1c", "end-to-end 4c"))
        verdict = "met" if best >= target else "NOT met"
        print(f"  {backend:<7} best {best:>10,.0f} msgs/s  target {target:>6,}  {verdict}")


async def main(args: argparse.Namespace) -> None:
    n = 3_000 if args.quick else args.messages
    runs: list[Run] = []
    server = None
    with tempfile.TemporaryDirectory(prefix="fnq-bench-mq-") as tmp:
        redis_url = args.redis_url
        if not redis_url:
            from tests.rig import RedisServer  # noqa: PLC0415

            server = RedisServer(Path(tmp)).start()
            redis_url = server.url
        try:
            backends = {
                "sqlite": f"sqlite://{Path(tmp) / 'mq.db'}",
                "redis": f"{redis_url}?prefix=fnq-bench",
            }
            for backend, url in backends.items():
                print(f"{backend}: {n} messages ...", flush=True)
                runs += await single_runs(url, backend, n)
                runs.append(await four_consumers(url, backend, n))
            print("rq ...", flush=True)
            runs += await asyncio.to_thread(rq_runs, redis_url, n)
        finally:
            if server is not None:
                server.stop()
    report(runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 messages per run")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--redis-url", default="", help="use this server instead of a fresh one")
    asyncio.run(main(parser.parse_args()))
