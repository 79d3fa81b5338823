"""RQ interop: fnq workers take ``fnq.call`` jobs from RQ queues (docs/rq.md).

A Python producer enqueues with plain RQ::

    Queue("default", connection=Redis(), serializer="json").enqueue(
        "fnq.call", app="demo", fn="echo", body="hello")

and reads the end back through RQ (``job.get_status()``, ``job.latest_result()``,
``rq info``). :class:`RQQueue` is a MessageQueue over such queues, plus
:meth:`RQQueue.complete`, which the worker calls instead of ``ack``.

The life of one job::

    rq:queue:<name> --reserve--> reserved (fnq:rq:reserved, STARTED in rq)
        --complete--> FINISHED + Result (or FAILED + failure Result)
        --release---> back on rq:queue:<name>, or rq:scheduled:<name> when delayed
        --lapse-----> back on its queue, deliveries + 1; FAILED after max deliveries
        --ack-------> reservation dropped, rq status untouched (duplicates only)

A job that is not a JSON ``fnq.call`` job with valid arguments is FAILED at
reserve with the reason as its exc_info and never reaches the caller. Every
reserve first sweeps lapsed reservations (of any consumer) and moves due
``rq:scheduled:<name>`` jobs onto their queue (what rq's scheduler does), all in
one Lua script (mq.rq_scripts). When nothing is ready it waits in
``BLMOVE q q LEFT LEFT`` on each queue (a no-op move that wakes on a push), at
most ``SCHEDULED_POLL_S``: a job scheduled meanwhile wakes nobody, so it starts
within about that much of its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis import Redis
from redis import exceptions as rexc
from redis.commands.core import AsyncScript
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from config.domain import Call, Outcome, utcnow
from config.errors import ConfigError
from config.settings import Settings, mask_url
from mq import rq_dead, rq_jobs, rq_scripts, wire
from mq.base import (
    REDIS_SCHEMES,
    Burials,
    Buried,
    DeadLetter,
    Message,
    QueueStats,
    claim_shielded,
    lapsed_reason,
)
from mq.errors import InvalidCall, QueueError, QueueUnavailable, ReservationLost
from mq.redis_link import FAULTS, unavailable
from mq.redis_url import FNQ_URL_OPTIONS, check_database, with_query

__all__ = ["RQDepth", "RQQueue", "open_rq_queues"]

T = TypeVar("T")
SCHEDULED_POLL_S = 1.0  # the longest wait between two looks at rq's scheduled jobs
OP_TIMEOUT_S = 10.0
SWEEP_LIMIT = 100
STARTED_GRACE_S = 60  # rq's own cleanup fails a started job only this long after fnq's lapse
RESERVED_KEY = "fnq:rq:reserved"
RECEIPTS_KEY = "fnq:rq:receipts"


@dataclass(frozen=True, slots=True)
class RQDepth:
    """One RQ queue's jobs by rq's state, as ``rq info`` shows them."""

    name: str
    queued: int  # on the queue
    scheduled: int  # in its ScheduledJobRegistry (enqueue_in/at, delayed releases)
    started: int  # executing: held by fnq workers (or rq's)
    failed: int  # in its FailedJobRegistry: fnq's dead letters of this queue


def open_rq_queues(url: str, queue_names: Sequence[str], settings: Settings) -> RQQueue:
    """An RQQueue over ``queue_names`` on the Redis at ``url``; connects on first use."""
    return RQQueue.from_url(url, queue_names, settings)


def without_fnq_options(url: str) -> str:
    """``url`` without the options of fnq's own queue (``prefix``, ``timeout_s``), which
    mean nothing to RQ's keys; the connection's options (TLS, timeouts) stay."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in FNQ_URL_OPTIONS]  # fmt: skip
    return with_query(parts, query)


def _rq_prefixes(sync: Redis) -> list[str]:
    """rq's key prefixes, from rq's own classes (order: rq_scripts.PREFIX_ORDER)."""
    execution = Execution("E", "J", sync)
    return [
        Job.redis_job_namespace_prefix,
        Queue.redis_queue_namespace_prefix,
        StartedJobRegistry("N", connection=sync).key.removesuffix("N"),
        execution.key.removesuffix("J:E"),
        ExecutionRegistry("J", sync).key.removesuffix("J"),
        ScheduledJobRegistry.key_template.format(""),
    ]


class RQQueue:
    """MessageQueue over RQ queues (taken in the order given, like an rq worker)."""

    def __init__(
        self,
        client: aioredis.Redis,
        sync: Redis,
        queue_names: Sequence[str],
        settings: Settings,
        *,
        op_timeout_s: float = OP_TIMEOUT_S,
    ) -> None:
        names = [n.strip() for n in queue_names if n.strip()]
        if not names:
            raise ConfigError("RQ interop needs at least one queue name (FN_RQ_QUEUES)")
        self._client = client
        self._sync = sync
        self._names = names
        self._op_timeout_s = op_timeout_s
        self._reservation_ms = settings.mq_reservation_msecs
        self._started_ttl_s = settings.mq_reservation_msecs // 1000 + STARTED_GRACE_S
        self._max_deliveries = settings.mq_max_deliveries
        self._max_body = settings.max_request_size
        self.worker_name = f"fnq:{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._prefixes = _rq_prefixes(sync)
        self._queue_keys = [Queue.redis_queue_namespace_prefix + n for n in names]
        self._failed_keys = [FailedJobRegistry.key_template.format(n) for n in names]
        self._scheduled_keys = [ScheduledJobRegistry.key_template.format(n) for n in names]
        self._started_keys = [StartedJobRegistry.key_template.format(n) for n in names]
        self._keys = [RESERVED_KEY, RECEIPTS_KEY]
        self._buried = Burials()
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(getattr(rq_scripts, name.upper()))
            for name in ("claim", "extend", "release", "ack")
        }

    @classmethod
    def from_url(cls, url: str, queue_names: Sequence[str], settings: Settings) -> RQQueue:
        if url.partition("://")[0].lower() not in REDIS_SCHEMES:
            raise ConfigError(
                f"RQ queues need a redis://, rediss:// or unix:// URL, not {mask_url(url)!r}"
            )
        try:
            check_database(urlsplit(url), "RQ URL")
            url = without_fnq_options(url)
            client = aioredis.Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=None)
            sync = Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=OP_TIMEOUT_S)
        except ValueError as exc:  # urlsplit or redis-py: a part it cannot read
            raise ConfigError(f"RQ URL: {exc}") from None
        return cls(client, sync, queue_names, settings)

    @property
    def queue_names(self) -> list[str]:
        return list(self._names)

    # ------------------------------------------------------------ plumbing
    async def _eval(self, name: str, args: Sequence[Any]) -> Any:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await self._scripts[name](keys=self._keys, args=[*self._prefixes, *args])
        except rexc.ResponseError as exc:
            raise QueueError(f"rq queue script {name}: {exc}") from exc
        except FAULTS as exc:
            raise unavailable("rq queue", exc, self._op_timeout_s) from exc

    async def _sync_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run rq/redis-py (blocking) code in a thread, bounded in time."""
        try:
            async with asyncio.timeout(self._op_timeout_s * 2):
                return await asyncio.to_thread(fn, *args, **kwargs)
        except rexc.ResponseError as exc:
            raise QueueError(f"rq queue: {exc}") from exc
        except FAULTS as exc:
            raise unavailable("rq queue", exc, self._op_timeout_s * 2) from exc

    @staticmethod
    def _receipt(msg: Message) -> tuple[str, str]:
        return msg.call.id, msg.receipt

    # ------------------------------------------------------------- produce
    async def push(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> str:
        """Enqueue ``call`` as a JSON ``fnq.call`` job (id = call id) on the first queue."""
        await self.push_new(call, delay_s=delay_s, priority=priority)
        return call.id

    async def push_new(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> bool:
        """``push``; False when the job ``call.id`` is live in rq (queued, scheduled,
        started: also after a plain ``ack``, which leaves rq's status alone)."""
        delay = call.delay_s if delay_s is None else delay_s
        prio = call.priority if priority is None else priority
        try:
            wire.check_call(call, prio, delay, self._max_body)
        except wire.WireError as exc:
            raise InvalidCall(f"call {call.id}: {exc}") from None
        try:
            return await self._sync_call(
                rq_dead.enqueue, self._sync, self._names[0], call, delay, prio
            )
        except ValueError as exc:  # rq's own rules: a job id has no '.' or ':'
            raise InvalidCall(f"call {call.id}: {exc}") from None

    async def push_many(self, calls: Sequence[Call]) -> list[str]:
        return [await self.push(call) for call in calls]

    # ------------------------------------------------------------- consume
    async def reserve(self, timeout_s: float) -> Message | None:
        msgs = await self.reserve_many(1, timeout_s)
        return msgs[0] if msgs else None

    async def reserve_many(
        self,
        max_count: int,
        timeout_s: float,
        *,
        ack: Sequence[Message] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        if ack:
            await self.ack_many(ack)
            if on_acked is not None:
                on_acked()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        made = self._buried.made
        while True:
            box: list[int] = []
            msgs = await claim_shielded(
                self._claim(max_count, box), self._hand_back, self._op_timeout_s
            )
            if msgs:
                return msgs
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if not box:  # failed or requeued something: look again at once
                continue
            if self._buried.made != made:  # burials are told without waiting
                return []
            # rq's enqueue_in/enqueue_at only add to the scheduled registry, which wakes
            # no one: look again every SCHEDULED_POLL_S, as rq's own scheduler does.
            wait_s = min(remaining, SCHEDULED_POLL_S)
            if box[0] >= 0:
                wait_s = min(wait_s, box[0] / 1000)
            await self._block(max(wait_s, 0.01))

    async def _claim(self, count: int, box: list[int]) -> list[Message]:
        args = [
            uuid.uuid4().hex[:28],
            count,
            self._reservation_ms,
            self._max_deliveries,
            SWEEP_LIMIT,
            *self._names,
        ]
        claimed, doomed, wait_ms, now_ms = await self._eval("claim", args)
        for jid_b, token_b, deliveries in doomed:
            reason = (
                f"{lapsed_reason(deliveries)} (FN_MQ_MAX_DELIVERIES={self._max_deliveries}): "
                "its workers were lost or stopped renewing it"
            )
            await self._bury(jid_b.decode(), token_b.decode(), reason)
        msgs: list[Message] = []
        for jid_b, _name, token_b, deliveries, flat in claimed:
            jid, token = jid_b.decode(), token_b.decode()
            fields = {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}
            try:
                call = rq_jobs.parse_call(jid, fields, self._max_body)
                job = rq_jobs.restore_job(self._sync, jid, fields)
            except rq_jobs.JobRejected as exc:  # JobUnreadable too: failed without rq's API
                await self._bury(jid, token, str(exc))
                continue
            started = await self._sync_call(
                rq_jobs.mark_started, self._sync, job, token, self.worker_name,
                self._started_ttl_s, now_s=int(now_ms) / 1000, receipts_key=RECEIPTS_KEY,
            )  # fmt: skip
            if not started:  # its reservation lapsed meanwhile: it is not this delivery's
                continue
            msgs.append(Message(call, int(deliveries), token, 0))
        if not msgs and not claimed and not doomed:
            box.append(int(wait_ms))
        return msgs

    async def _block(self, wait_s: float) -> None:
        """Wait until a queue gets a job (or ``wait_s`` passes), changing nothing."""

        def waiter(key: str) -> Awaitable[Any]:
            # BLMOVE takes a decimal timeout (Redis >= 6); redis-py's hint says int.
            return self._client.blmove(key, key, wait_s, "LEFT", "LEFT")  # type: ignore[arg-type]

        tasks = [asyncio.ensure_future(waiter(k)) for k in self._queue_keys]
        try:
            async with asyncio.timeout(wait_s + self._op_timeout_s):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError as exc:
            raise QueueUnavailable("rq queue: no answer while waiting for jobs") from exc
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, FAULTS):
                raise unavailable("rq queue", res, self._op_timeout_s) from res

    async def _hand_back(self, msgs: list[Message]) -> None:
        for msg in msgs:
            await self.release(msg)

    async def _bury(self, job_id: str, token: str, reason: str) -> None:
        """Fail a job this consumer will not run; reported by ``take_buried`` when
        this ended it (a record may have been written for its call)."""
        if await self._finish(job_id, token, rq_jobs.Finish(exc_string=f"fnq: {reason}")):
            self._buried.add(job_id, reason)

    def take_buried(self) -> list[Buried]:
        return self._buried.take()

    async def _finish(
        self, job_id: str, token: str, end: rq_jobs.Finish, created_at: datetime | None = None
    ) -> bool:
        ended = await self._sync_call(
            rq_jobs.finish,
            self._sync,
            job_id,
            token,
            end,
            worker_name=self.worker_name,
            created_at=created_at,
        )
        await self._eval("ack", [job_id, token])
        return ended

    async def complete(self, msg: Message, outcome: Outcome) -> None:
        """End the job in rq: FINISHED with the response as its result on success,
        FAILED with the error text otherwise. The normal end instead of ``ack``.

        A job another delivery already ended keeps that end, and so does a job rq
        made anew under the id meanwhile (only this delivery's reservation and
        execution are dropped).
        """
        await self._finish(*self._receipt(msg), rq_jobs.finish_of(outcome), msg.call.created_at)

    async def ack(self, msg: Message) -> None:
        await self._eval("ack", self._receipt(msg))

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        for msg in msgs:
            await self.ack(msg)

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        await self._eval("release", [*self._receipt(msg), max(0.0, float(delay_s))])

    async def extend(self, msg: Message) -> None:
        beat = rq_jobs.rq_time(utcnow())
        args = [*self._receipt(msg), self._reservation_ms, self._started_ttl_s, beat]
        if not await self._eval("extend", args):
            raise ReservationLost(f"rq job {msg.call.id}: reservation {msg.receipt} is gone")

    async def dead_letter(self, msg: Message, reason: str) -> None:
        end = rq_jobs.Finish(exc_string=f"fnq: {reason}")
        await self._finish(*self._receipt(msg), end, msg.call.created_at)

    # --------------------------------------------------------- dead letters
    async def dead_list(self, limit: int = 100) -> list[DeadLetter]:
        """FAILED jobs of these queues (rq's FailedJobRegistry), oldest first."""
        return await self._sync_call(
            rq_dead.dead_list, self._sync, self._names, limit, self._max_body
        )

    async def dead_among(self, ids: Sequence[str]) -> list[str]:
        return await self._sync_call(rq_dead.among, self._sync, self._names, ids)

    async def dead_requeue(self, ids: Sequence[str] | None = None) -> int:
        return await self._sync_call(rq_dead.requeue, self._sync, self._names, ids)

    async def dead_purge(self, ids: Sequence[str] | None = None) -> int:
        return await self._sync_call(rq_dead.purge, self._sync, self._names, ids)

    async def stats(self) -> QueueStats:
        """ready: jobs on the queues; reserved: fnq reservations on this Redis (all
        queues); dead: FailedJobRegistry sizes; delayed: ScheduledJobRegistry sizes."""

        def fill(pipe: Any) -> None:
            for i, key in enumerate(self._queue_keys):
                pipe.llen(key)
                pipe.zcard(self._failed_keys[i])
                pipe.zcard(self._scheduled_keys[i])
            pipe.zcard(RESERVED_KEY)

        res = await self._snapshot(fill)
        n = len(self._names)
        return QueueStats(
            ready=sum(int(res[3 * i]) for i in range(n)),
            delayed=sum(int(res[3 * i + 2]) for i in range(n)),
            reserved=int(res[-1]),
            dead=sum(int(res[3 * i + 1]) for i in range(n)),
        )

    async def depths(self) -> list[RQDepth]:
        """Each queue's jobs as rq counts them (``rq info``), read at one instant. Only
        reads: rq's own registry cleanup, which ``rq info`` runs, is left to rq."""

        def fill(pipe: Any) -> None:
            for i, key in enumerate(self._queue_keys):
                pipe.llen(key)
                pipe.zcard(self._scheduled_keys[i])
                pipe.zcard(self._started_keys[i])
                pipe.zcard(self._failed_keys[i])

        res = [int(r) for r in await self._snapshot(fill)]
        return [RQDepth(name, *res[4 * i : 4 * i + 4]) for i, name in enumerate(self._names)]

    async def _snapshot(self, fill: Callable[[Any], None]) -> list[Any]:
        """The replies of the commands ``fill`` adds to a transaction (MULTI/EXEC)."""
        try:
            async with asyncio.timeout(self._op_timeout_s):
                pipe = self._client.pipeline(transaction=True)
                fill(pipe)
                return list(await pipe.execute())
        except FAULTS as exc:
            raise unavailable("rq queue", exc, self._op_timeout_s) from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        finally:
            with contextlib.suppress(rexc.RedisError):
                await asyncio.to_thread(self._sync.close)
