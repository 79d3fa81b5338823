"""RQQueue's producer side and dead letters, through rq's own API (synchronous).

Dead letters of the RQ adapter are the FAILED jobs in rq's FailedJobRegistry of
each queue; ``dead_requeue`` is rq's ``FailedJobRegistry.requeue`` (with fnq's
delivery count reset) and ``dead_purge`` deletes the jobs. Given ids, these and
``dead_among`` ask Redis about those ids only (ZMSCORE), however many dead letters
the registries hold.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

from redis import Redis
from redis.exceptions import WatchError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from config.domain import Call, utcnow
from mq import rq_jobs
from mq.base import DeadLetter
from mq.errors import QueueUnavailable

_LIVE = {b"queued", b"started", b"scheduled", b"deferred", b"created"}
ENQUEUE_ATTEMPTS = 5  # of the enqueue transaction, while the job keeps changing under it
MEMBERSHIP_BATCH = 1_000  # dead-letter ids looked up in a registry with one command


def enqueue(conn: Redis, queue_name: str, call: Call, delay_s: float, priority: int) -> bool:
    """Enqueue ``call`` the way a documented producer would; False, doing nothing, when
    its job is live (queued, scheduled, started, ...).

    The look at the job's status and the enqueue are one transaction (WATCH on the
    job's hash), so of two producers of one id only one enqueues. A job that had
    ended is enqueued again as new: its delivery count starts again.
    """
    kwargs: dict[str, Any] = {"app": call.app, "fn": call.fn}
    if call.body:
        try:
            kwargs["body"] = call.body.decode("utf-8")
        except UnicodeDecodeError:
            kwargs["body_b64"] = base64.b64encode(call.body).decode()
    if call.headers:
        kwargs["headers"] = dict(call.headers)
    queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
    key = Job.key_for(call.id)
    for _ in range(ENQUEUE_ATTEMPTS):
        with conn.pipeline() as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                status, origin = cast(list[bytes | None], pipe.hmget(key, ["status", "origin"]))
                if status in _LIVE:
                    return False
                pipe.multi()
                pipe.hdel(key, "fnq_deliveries", "fnq_receipt")
                if origin:
                    _forget_end(pipe, conn, call.id, origin.decode())
                options: dict[str, Any] = {"job_id": call.id, "pipeline": pipe, **kwargs}
                if delay_s > 0:
                    queue.enqueue_in(timedelta(seconds=delay_s), rq_jobs.FUNC_NAME, **options)
                else:
                    queue.enqueue(rq_jobs.FUNC_NAME, at_front=priority > 0, **options)
                pipe.execute()
            except WatchError:  # the job changed meanwhile: look again
                continue
            return True
    raise QueueUnavailable(f"rq queue: job {call.id} kept changing while it was enqueued")


def _forget_end(pipe: Any, conn: Redis, job_id: str, origin: str) -> None:
    """The ended job's place in its queue's registries of ends, and its results, go:
    the job enqueued again under its id is a new one."""
    for registry in (FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry):
        pipe.zrem(registry(origin, connection=conn).key, job_id)
    pipe.delete(Result.get_key(job_id))  # type: ignore[no-untyped-call]


def _registries(conn: Redis, names: Sequence[str]) -> list[FailedJobRegistry]:
    return [FailedJobRegistry(n, connection=conn, serializer=JSONSerializer) for n in names]


def dead_list(conn: Redis, names: Sequence[str], limit: int, max_body: int) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    for registry in _registries(conn, names):
        for job_id in registry.get_job_ids(0, max(limit, 1) - 1, cleanup=False):
            fields = cast(dict[bytes, bytes], conn.hgetall(Job.key_for(job_id)))
            if not fields:
                continue
            job = rq_jobs.restore_job(conn, job_id, fields)
            latest = Result.fetch_latest(job, serializer=JSONSerializer)
            reason = (latest.exc_string if latest is not None else None) or ""
            try:
                call: Call | None = rq_jobs.parse_call(job_id, fields, max_body)
            except rq_jobs.JobRejected:
                call = None
            out.append(
                DeadLetter(
                    id=job_id,
                    reason=reason,
                    deliveries=int(fields.get(b"fnq_deliveries", b"0") or 0),
                    died_at=job.ended_at or utcnow(),
                    raw=rq_jobs.job_data(fields.get(b"data", b"")),
                    call=call,
                )
            )
    out.sort(key=lambda d: d.died_at)
    return out[:limit]


def _held(
    conn: Redis, registries: Sequence[FailedJobRegistry], ids: Sequence[str]
) -> list[set[str]]:
    """Which of ``ids`` each registry holds, asked of Redis about those ids only: a
    ZMSCORE per registry for each MEMBERSHIP_BATCH of them, one round trip a batch."""
    held: list[set[str]] = [set() for _ in registries]
    for start in range(0, len(ids), MEMBERSHIP_BATCH):
        batch = list(ids[start : start + MEMBERSHIP_BATCH])
        with conn.pipeline(transaction=False) as pipe:
            for registry in registries:
                pipe.zmscore(registry.key, batch)
            replies = cast(list[list[float | None]], pipe.execute())
        for found, scores in zip(held, replies, strict=True):
            found.update(i for i, score in zip(batch, scores, strict=True) if score is not None)
    return held


def _chosen(
    conn: Redis, names: Sequence[str], ids: Sequence[str] | None
) -> list[tuple[FailedJobRegistry, list[str]]]:
    """Each registry with the ids to handle in it: all it holds (``ids`` None), else
    those of ``ids`` it holds, each once, in the order given."""
    registries = _registries(conn, names)
    if ids is None:
        return [(r, r.get_job_ids(cleanup=False)) for r in registries]
    distinct = list(dict.fromkeys(ids))
    held = _held(conn, registries, distinct)
    return [(r, [i for i in distinct if i in h]) for r, h in zip(registries, held, strict=True)]


def among(conn: Redis, names: Sequence[str], ids: Sequence[str]) -> list[str]:
    held = set().union(*_held(conn, _registries(conn, names), list(dict.fromkeys(ids))))
    return [i for i in ids if i in held]


def requeue(conn: Redis, names: Sequence[str], ids: Sequence[str] | None) -> int:
    moved = 0
    for registry, job_ids in _chosen(conn, names, ids):
        for job_id in job_ids:
            if not conn.exists(Job.key_for(job_id)):
                registry.remove(job_id)
                continue
            try:
                conn.hset(Job.key_for(job_id), "fnq_deliveries", 0)
                registry.requeue(job_id)
            except (InvalidJobOperation, NoSuchJobError):
                continue
            moved += 1
    return moved


def purge(conn: Redis, names: Sequence[str], ids: Sequence[str] | None) -> int:
    removed = 0
    for registry, job_ids in _chosen(conn, names, ids):
        for job_id in job_ids:
            try:
                registry.remove(job_id, delete_job=True)
            except NoSuchJobError:
                registry.remove(job_id)
            removed += 1
    return removed
