"""Call completions per second: group commit against one transaction per call.

A completion is what a worker writes for one call: ``record_running`` then
``record_outcome`` with a small response and log. Each backend runs the same
completions twice in one process:

* batched   - through the datastore API, many workers at once; concurrent
              writes share transactions (group commit);
* baseline  - the same two statements per call, one transaction per call,
              with the same number of concurrent workers.

    .venv/bin/python -m bench.datastore            # 20,000 calls per run
    .venv/bin/python -m bench.datastore --quick    # 2,000 calls, under a minute
    .venv/bin/python -m bench.datastore --pg-url postgresql://user@host/db

Without --pg-url a throwaway PostgreSQL server is started (tests.rig; it runs
with fsync off, so its numbers show round trips and CPU, not disk flushes).
SQLite runs with WAL and synchronous=FULL: one fsync per transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.domain import Call, CallStatus, Outcome, Response, new_call_id, utcnow
from config.settings import load_settings
from datastore.backend import Write
from datastore.base import open_datastore
from datastore.common import SqlDatastore


@dataclass
class Run:
    backend: str
    mode: str
    calls: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


def outcome() -> Outcome:
    now = utcnow()
    return Outcome(
        CallStatus.SUCCESS,
        response=Response(200, {"Content-Type": "application/json"}, b'{"ok": true}'),
        log=b"processing item\ndone in 3 ms\n",
        container_id="bench",
        started_at=now,
        completed_at=now,
    )


async def drive(calls: list[Call], workers: int, one: Callable[[Call], Awaitable[Any]]) -> float:
    """Run ``one`` for every call from ``workers`` concurrent tasks; seconds taken."""
    queue = iter(calls)

    async def worker() -> None:
        for c in queue:
            await one(c)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(workers):
            tg.create_task(worker(), name=f"bench-worker-{i}")
    return time.perf_counter() - start


def new_calls(n: int) -> list[Call]:
    return [Call(new_call_id(), "bench", "fn", b"{}") for _ in range(n)]


async def batched(store: SqlDatastore, n: int, workers: int) -> tuple[float, int]:
    result = outcome()

    async def one(c: Call) -> None:
        await store.record_running(c, 1, "bench")
        await store.record_outcome(c, result, 1, "bench")

    writer = store.writer
    before = writer.batches
    seconds = await drive(new_calls(n), workers, one)
    return seconds, writer.batches - before


def _ops(store: SqlDatastore, c: Call) -> list[tuple[Write, dict[str, Any], bytes | None]]:
    row, log = store._outcome_row(c, outcome(), 1, "bench", CallStatus.SUCCESS, with_request=False)
    return [(Write.RUNNING, store._running_params(c, 1, "bench"), None), (Write.FINISH, row, log)]


async def baseline_sqlite(store: SqlDatastore, n: int, workers: int) -> tuple[float, int]:
    from datastore import sqlite  # noqa: PLC0415

    assert isinstance(store, sqlite.SqliteDatastore)
    conn = sqlite.connect(store.path)
    state = {"synchronous": "FULL"}  # the pragmas last set on conn, as connect() leaves them
    lock = asyncio.Lock()  # one sqlite3 connection: one statement at a time

    async def one(c: Call) -> None:
        ops = _ops(store, c)
        async with lock:
            await asyncio.to_thread(sqlite.run_batch, conn, ops, state)

    try:
        return await drive(new_calls(n), workers, one), n
    finally:
        conn.close()


async def baseline_postgres(store: SqlDatastore, n: int, workers: int) -> tuple[float, int]:
    from datastore import postgres  # noqa: PLC0415

    assert isinstance(store, postgres.PostgresDatastore)

    async def one(c: Call) -> None:
        pool = store._pool
        async with pool.acquire(timeout=postgres.ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
            for kind, params, log in _ops(store, c):
                await postgres.apply(conn, kind, params, log)

    return await drive(new_calls(n), workers, one), n


async def measure(backend: str, db_url: str, data_dir: Path, n: int, workers: int) -> list[Run]:
    settings = load_settings(data_dir=data_dir, db_url=db_url)
    store = await open_datastore(settings)
    assert isinstance(store, SqlDatastore)
    runs = []
    try:
        done_before = (await store.count_by_status())[CallStatus.SUCCESS]
        await batched(store, min(n, 500), workers)  # warm-up: connections, caches
        seconds, tx = await batched(store, n, workers)
        runs.append(Run(backend, "batched", n, seconds, tx))
        base = baseline_sqlite if backend == "sqlite" else baseline_postgres
        seconds, tx = await base(store, n, workers)
        runs.append(Run(backend, "one tx per call", n, seconds, tx))
        assert (await store.count_by_status())[CallStatus.SUCCESS] - done_before == 2 * n + min(
            n, 500
        )
    finally:
        await store.close()
    return runs


def print_runs(runs: list[Run]) -> None:
    header = f"{'backend':<9} {'mode':<16} {'calls':>7} {'seconds':>8} {'calls/s':>9} {'tx':>7}"
    print(header)
    print("-" * len(header))
    for r in runs:
        print(f"{r.backend:<9} {r.mode:<16} {r.calls:>7} {r.seconds:>8.2f} {r.rate:>9.0f} "
              f"{r.transactions:>7}")  # fmt: skip
    print()
    for backend in dict.fromkeys(r.backend for r in runs):
        batch, base = (r for r in runs if r.backend == backend)
        print(f"{backend}: batched / one tx per call = {batch.rate / base.rate:.1f}x "
              f"({batch.calls / batch.transactions:.1f} calls per transaction)")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 calls per run")
    parser.add_argument("--calls", type=int, help="calls per run (default 20,000)")
    parser.add_argument("--workers", type=int, default=64, help="concurrent workers")
    parser.add_argument("--pg-url", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    n = args.calls or (2_000 if args.quick else 20_000)

    with tempfile.TemporaryDirectory(prefix="fnq-bench-") as tmp:
        root = Path(tmp)
        runs = await measure("sqlite", f"sqlite:///{root / 'fnq.db'}", root, n, args.workers)
        if not args.no_postgres:
            server = None
            url = args.pg_url
            if url is None:
                from tests.rig import PostgresServer, pg_tempdir  # noqa: PLC0415

                server = await asyncio.to_thread(PostgresServer(pg_tempdir(root)).start)
                url = server.url
            try:
                runs += await measure("postgres", url, root, n, args.workers)
            finally:
                if server is not None:
                    await asyncio.to_thread(server.stop)
    print(f"{n} call completions per run, {args.workers} concurrent workers\n")
    print_runs(runs)


if __name__ == "__main__":
    asyncio.run(main())
