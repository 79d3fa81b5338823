"""Worker processes for the end-to-end benchmarks, and how calls are fed and awaited.

A :class:`Cluster` is one queue URL and one datastore (SQLite in a temporary
FN_DATA_DIR unless a PostgreSQL URL is given) shared by ``fnq worker``
subprocesses, all with one container classifier label so that whatever they
leave behind can be removed. Producers push straight to the queue (as
``mq.producer`` or redis-cli would; no ``queued`` record), and a run ends when
the datastore counts the expected number of final records.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import FNQ, env_without_fn, remove_labelled
from config.domain import Call, CallStatus, Function, new_call_id
from config.settings import Settings, load_settings
from datastore.base import CallRecord, Datastore, open_datastore
from mq.base import MessageQueue, open_queue

BATCH = 100
POLL_S = 0.005  # how often wait_final looks near the end of a run
POLL_BUSY_S = 0.025  # and while more than POLL_BUSY_ABOVE messages are left (at under
POLL_BUSY_ABOVE = 100  # 4,000 calls/s those take longer than one such wait)
FINAL = (CallStatus.SUCCESS, CallStatus.ERROR, CallStatus.TIMEOUT, CallStatus.CANCELLED)


@dataclass
class Cluster:
    tmp: Path
    mq_url: str
    tag: str
    db_url: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    queue: MessageQueue | None = None
    store: Datastore | None = None

    @property
    def env(self) -> dict[str, str]:
        env = env_without_fn()
        env.update(
            {
                "FN_DATA_DIR": str(self.tmp / "data"),
                "FN_MQ_URL": self.mq_url,
                "FN_LOG_LEVEL": "WARNING",
                "FN_ASYNC_CHEW_POLL_MSECS": "1000",
                "FN_SHUTDOWN_GRACE_MSECS": "5000",
                "FN_CONTAINER_LABEL_TAG": self.tag,
                "FN_HOT_START_TIMEOUT_MSECS": "30000",
            }
        )
        if self.db_url:
            env["FN_DB_URL"] = self.db_url
        env.update(self.extra_env)
        return env

    @property
    def settings(self) -> Settings:
        overrides = {k[3:].lower(): v for k, v in self.env.items() if k.startswith("FN_")}
        return load_settings(**overrides)

    async def open(self) -> Cluster:
        (self.tmp / "data").mkdir(parents=True, exist_ok=True)
        settings = self.settings
        self.queue = open_queue(settings.mq_url, settings)
        self.store = await open_datastore(settings)
        return self

    async def close(self) -> None:
        self.stop_workers()
        if self.queue is not None:
            await self.queue.close()
        if self.store is not None:
            await self.store.close()
        remove_labelled(self.tag)

    # ---------------------------------------------------------------- workers

    def start_worker(
        self, *args: str, prefix: tuple[str, ...] = (), env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``fnq worker ARGS`` after the command ``prefix``; ``env`` overrides the
        cluster's variables for this worker only (say, its own FN_MQ_URL)."""
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*prefix, FNQ, "worker", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=log,
        )
        self.procs.append(proc)
        return proc

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def worker_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in self.tmp.glob("worker-*.log")
        )

    # ------------------------------------------------------------ calls in/out

    async def register(self, *fns: Function) -> None:
        assert self.store is not None
        for fn in fns:
            await self.store.create_fn(fn)

    async def push(self, calls: list[Call]) -> None:
        assert self.queue is not None
        for i in range(0, len(calls), BATCH):
            await self.queue.push_many(calls[i : i + BATCH])

    async def final_count(self, app: str) -> int:
        assert self.store is not None
        counts = await self.store.count_by_status(app)
        return sum(counts.get(s, 0) for s in FINAL)

    async def wait_final(self, app: str, total: int, timeout_s: float = 300.0) -> float:
        """Poll until ``total`` calls of ``app`` are final; the perf_counter time seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            # Counting records scans the app's rows: only once the queue holds nothing
            # (a worker acks a call after its final record is stored). While many calls
            # are still queued, poll less often: this process must not take the CPU the
            # worker needs on a small machine, and the end is still seen within 5 ms.
            left = await self._queued()
            if left == 0 and await self.final_count(app) >= total:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {await self.final_count(app)} of {total} calls final after "
                    f"{timeout_s}s\n--- worker logs ---\n{self.worker_logs()}"
                )
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a worker exited\n--- worker logs ---\n{self.worker_logs()}")
            await asyncio.sleep(POLL_BUSY_S if left > POLL_BUSY_ABOVE else POLL_S)

    async def _queued(self) -> int:
        """Messages not yet acked: ready, delayed or reserved."""
        if self.queue is None:
            return 0
        stats = await self.queue.stats()
        return stats.ready + stats.delayed + stats.reserved

    async def records(self, ids: list[str]) -> list[CallRecord]:
        assert self.store is not None
        out = []
        for call_id in ids:
            rec = await self.store.get_call(call_id)
            if rec is not None:
                out.append(rec)
        return out

    async def run_calls(self, app: str, fn: str, n: int, body: bytes, done_before: int) -> float:
        """Push ``n`` calls at once; seconds from the first push to the last final record."""
        calls = make_calls(app, fn, n, body)
        t0 = time.perf_counter()
        await self.push(calls)
        t1 = await self.wait_final(app, done_before + n)
        return t1 - t0


def make_calls(app: str, fn: str, n: int, body: bytes) -> list[Call]:
    return [Call(new_call_id(), app, fn, body) for _ in range(n)]


async def stop(cluster: Cluster) -> None:
    with contextlib.suppress(Exception):
        await cluster.close()
