"""RQ jobs as fnq calls: reading a job's data, and writing its end through rq's API.

Reading never uses an rq serializer: the stored ``data`` field is inflated
(rq zlib-compresses it; old jobs may be plain) and parsed as JSON here, so a
pickled job is rejected without ever being unpickled. Job objects are built
with rq's ``JSONSerializer`` for the same reason (``Job.restore`` only loads
``meta``/``result`` through the serializer, and JSON cannot run code).

Everything below is synchronous (rq and redis-py); mq.rq runs it through
``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from rq.defaults import DEFAULT_FAILURE_TTL, DEFAULT_RESULT_TTL
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from config.domain import Call, CallStatus, Outcome, frozen_map, utcnow
from mq import wire

FUNC_NAME = "fnq.call"
PARAMS = ("app", "fn", "body", "headers")  # positional order of fnq.call(...)
KEYWORDS = frozenset({*PARAMS, "body_b64"})
FINAL = frozenset({b"finished", b"failed", b"canceled", b"stopped"})
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # rq's utcformat


class JobRejected(ValueError):
    """The job cannot become an fnq call; the text says why (stored as its exc_info)."""


class JobUnreadable(JobRejected):
    """rq itself cannot read the job's hash (one written by hand, or by an rq that
    stores a field otherwise): it is failed without rq's API (see ``finish``)."""


@dataclass(frozen=True, slots=True)
class Finish:
    """How a delivery ends in rq: a return value (FINISHED) or an error text (FAILED)."""

    return_value: Any = None
    exc_string: str | None = None


def rq_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime(_TS_FORMAT)


def _parse_time(raw: bytes | None) -> datetime:
    try:
        return datetime.strptime((raw or b"").decode(), _TS_FORMAT).replace(tzinfo=UTC)
    except (ValueError, UnicodeDecodeError):
        return utcnow()


# ------------------------------------------------------------------ reading


def job_data(raw: bytes) -> bytes:
    """The job's ``data`` as rq serialized it (inflated when compressed)."""
    try:
        return zlib.decompress(raw)
    except zlib.error:
        return raw


def _decode_tuple(data: bytes) -> list[Any]:
    if data[:1] == b"\x80":
        raise JobRejected(
            "job data is pickled (enqueued with rq's default serializer); fnq reads only "
            "JSON jobs: use Queue(..., serializer='json')"
        )
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number of over 4300 digits
        raise JobRejected(
            "job data is not JSON: enqueue with Queue(..., serializer='json')"
        ) from None
    if not isinstance(value, list) or len(value) != 4:
        raise JobRejected("job data is not rq's [func_name, instance, args, kwargs]")
    return value


def _bind(args: Any, kwargs: Any) -> dict[str, Any]:
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise JobRejected("job args must be a list and kwargs an object")
    if len(args) > len(PARAMS):
        raise JobRejected(f"fnq.call takes at most {len(PARAMS)} positional arguments {PARAMS}")
    bound = dict(zip(PARAMS, args, strict=False))
    unknown = sorted(set(kwargs) - KEYWORDS)
    if unknown:
        raise JobRejected(f"fnq.call got unknown keyword(s) {', '.join(unknown[:5])}")
    twice = sorted(set(kwargs) & set(bound))
    if twice:
        raise JobRejected(f"fnq.call got {', '.join(twice)} both by position and by keyword")
    bound.update(kwargs)
    return bound


def _body(bound: Mapping[str, Any], headers: dict[str, str]) -> bytes:
    body, b64 = bound.get("body"), bound.get("body_b64")
    if body is not None and b64 is not None:
        raise JobRejected("give body or body_b64, not both")
    if b64 is not None:
        if not isinstance(b64, str):
            raise JobRejected("body_b64 must be a base64 string")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise JobRejected("body_b64 is not valid base64") from None
    if body is None:
        return b""
    if isinstance(body, str):
        text = body
    else:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON "\udcff"
        raise JobRejected("body is not UTF-8 text (use body_b64 for bytes)") from None


def parse_call(job_id: str, fields: Mapping[bytes, bytes], max_body_bytes: int) -> Call:
    """The call a JSON ``fnq.call`` job asks for, or JobRejected with the reason."""
    func, instance, args, kwargs = _decode_tuple(job_data(fields.get(b"data", b"")))
    if func != FUNC_NAME:
        raise JobRejected(f"job calls {str(func)[:120]!r}; fnq runs only {FUNC_NAME!r} jobs")
    if instance is not None:
        raise JobRejected("fnq.call is not a method: the job must have no instance")
    bound = _bind(args, kwargs)
    for name in ("app", "fn"):
        if not isinstance(bound.get(name), str):
            raise JobRejected(f"fnq.call needs {name}= as a string")
    raw_headers = bound.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise JobRejected("headers must be an object of name -> string")
    headers = dict(raw_headers)
    try:
        body = wire.check_body(_body(bound, headers), max_body_bytes)
        return Call(
            id=wire.check_id(job_id),
            app=wire.check_name("app", bound["app"]),
            fn=wire.check_name("fn", bound["fn"]),
            body=body,
            headers=frozen_map(wire.check_headers(headers)),
            created_at=_parse_time(fields.get(b"created_at")),
        )
    except wire.WireError as exc:
        raise JobRejected(str(exc)) from None


def restore_job(conn: Redis, job_id: str, fields: Mapping[bytes, bytes]) -> Job:
    """rq's Job of the hash ``fields``; JobUnreadable if rq cannot read them."""
    job = Job(job_id, connection=conn, serializer=JSONSerializer)
    try:
        job.restore(dict(fields))
    except Exception as exc:  # a pure parse of given fields; rq raises ValueError,
        # AssertionError, UnicodeDecodeError, JSONDecodeError, ... by field
        raise JobUnreadable(f"rq cannot read job {job_id}: {type(exc).__name__}: {exc}") from exc
    return job


# ------------------------------------------------------------------ outcomes


def finish_of(outcome: Outcome) -> Finish:
    """What rq should record for an outcome (see docs/rq.md for the shapes)."""
    resp = outcome.response
    if outcome.status is CallStatus.SUCCESS:
        value: dict[str, Any] = {"status": 200, "headers": {}, "body": ""}
        if resp is not None:
            value = {"status": resp.status, "headers": dict(resp.headers), "body": None}
            try:
                value["body"] = resp.body.decode("utf-8")
            except UnicodeDecodeError:
                value["body_b64"] = base64.b64encode(resp.body).decode()
            if resp.truncated:
                value["truncated"] = True
        return Finish(return_value=value)
    kind = f" ({outcome.failure.value})" if outcome.failure else ""
    text = f"fnq: call {outcome.status.value}{kind}: {outcome.error or 'no detail'}"
    if resp is not None:
        excerpt = resp.body[:2000].decode("utf-8", "replace")
        text += f"\nfunction response {resp.status}: {excerpt}"
    return Finish(exc_string=text)


# ------------------------------------------------------------ rq bookkeeping


def mark_started(
    conn: Redis,
    job: Job,
    token: str,
    worker_name: str,
    ttl_s: int,
    *,
    now_s: float,
    receipts_key: str,
) -> bool:
    """STARTED in rq's terms: status, started_at, worker name, an execution in the
    queue's StartedJobRegistry (its id is the reservation token); False, changing
    nothing, when ``token`` no longer holds the job's reservation (``receipts_key``:
    fnq's hash of job id -> token) or the job changed since it was looked at.

    ``now_s``: the Redis server's time, which the registries' expiries count from
    (rq's own count from this host's clock: one far enough behind would have rq's
    cleanup fail the job as abandoned until its first extend, as mq.rq_scripts
    EXTEND sets them).

    One transaction that watches the job: a write that reaches the server late (its
    connection timed out on a silent network, and the server got it once the network
    was back) must not make STARTED a job that lapsed meanwhile and went back to its
    queue, where it would then be skipped as not queued, and never run. (redis-py
    sends a watching transaction once, never again on a connection error.) Raises
    redis' ConnectionError when the connection failed."""
    with conn.pipeline() as pipe:
        try:
            pipe.watch(job.key)  # type: ignore[no-untyped-call]
            held = pipe.hget(receipts_key, job.id)
            receipt = pipe.hget(job.key, "fnq_receipt")
            if held != token.encode() or receipt != token.encode():
                return False
            pipe.multi()
            job.prepare_for_execution(worker_name, pipe)
            execution = Execution(token, job.id, conn, worker_name=worker_name)
            execution.save(ttl=ttl_s, pipeline=pipe)
            executions = ExecutionRegistry(job_id=job.id, connection=conn)
            executions.add(execution, ttl=ttl_s, pipeline=pipe)
            job.started_job_registry.add_execution(execution, pipeline=pipe, ttl=ttl_s)
            started = {execution.composite_key: now_s + ttl_s}
            pipe.zadd(job.started_job_registry.key, started, xx=True)
            pipe.zadd(executions.key, {token: now_s + ttl_s + 60}, xx=True)
            pipe.execute()
        except WatchError as exc:
            lost = exc.__context__
            if isinstance(lost, RedisConnectionError | RedisTimeoutError):
                raise RedisConnectionError(f"marking job {job.id} started: {lost}") from exc
            return False
    return True


def finish(
    conn: Redis,
    job_id: str,
    token: str,
    end: Finish,
    *,
    worker_name: str,
    created_at: datetime | None = None,
) -> bool:
    """End one delivery in rq: drop its execution and, unless the job is already
    final, make it FINISHED or FAILED with a Result. One transaction (WATCH job).
    ``created_at``: the delivered job's; a job of the id created at another time is
    a new one (rq deleted the delivered job, then the id was enqueued again): it is
    left as it is.

    The reservation itself is dropped by the caller afterwards (the ACK script,
    guarded by the token). Returns False when the job is gone or was already final.
    """
    job_key = Job.key_for(job_id)
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(job_key)  # type: ignore[no-untyped-call]
                fields = cast(dict[bytes, bytes], pipe.hgetall(job_key))
                if not fields:
                    return False
                pipe.multi()
                final = fields.get(b"status") in FINAL or not _same_job(fields, created_at)
                try:
                    job = restore_job(conn, job_id, fields)
                except JobUnreadable as exc:
                    if not final:
                        _fail_unreadable(pipe, job_id, fields, end.exc_string or f"fnq: {exc}")
                    pipe.execute()
                    return not final
                execution = Execution(token, job_id, conn, worker_name=worker_name)
                execution.created_at = job.started_at or execution.created_at
                execution.delete(job=job, pipeline=pipe)
                if not final:
                    _record(pipe, job, execution, end, worker_name)
                pipe.execute()
            except WatchError:
                continue
            return not final


def _fail_unreadable(pipe: Any, job_id: str, fields: Mapping[bytes, bytes], text: str) -> None:
    """FAILED by hand, as rq would store it as far as it can be: status, end time and
    the reason in the hash, the job in its queue's failed registry (when its origin
    can be read). No Result: rq could not show it for a job it cannot read."""
    now = utcnow()
    pipe.hset(
        Job.key_for(job_id),
        mapping={
            "status": JobStatus.FAILED.value,
            "ended_at": rq_time(now),
            "exc_info": zlib.compress(text.encode("utf-8", "replace")),
        },
    )
    try:
        origin = fields.get(b"origin", b"").decode()
    except UnicodeDecodeError:
        return
    if origin:
        expires = now.timestamp() + DEFAULT_FAILURE_TTL
        pipe.zadd(FailedJobRegistry.key_template.format(origin), {job_id: expires})


def _same_job(fields: Mapping[bytes, bytes], created_at: datetime | None) -> bool:
    if created_at is None:
        return True
    try:
        made = datetime.strptime(fields.get(b"created_at", b"").decode(), _TS_FORMAT)
    except (ValueError, UnicodeDecodeError):
        return True  # no time to tell them apart by (parse_call took the time of reading)
    return made.replace(tzinfo=UTC) == created_at


def _record(pipe: Any, job: Job, execution: Execution, end: Finish, worker_name: str) -> None:
    job.ended_at = utcnow()
    common: dict[str, Any] = {
        "worker_name": worker_name,
        "pipeline": pipe,
        "execution_id": execution.id,
        "execution_started_at": execution.created_at,
        "execution_ended_at": job.ended_at,
    }
    if end.exc_string is None:
        ttl = job.get_result_ttl(DEFAULT_RESULT_TTL)
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        job.save(pipeline=pipe, include_meta=False, include_result=False)
        if ttl != 0:
            Result.create(job, Result.Type.SUCCESSFUL, ttl, return_value=end.return_value, **common)
            FinishedJobRegistry(job.origin, connection=job.connection).add(job, ttl, pipe)
        job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
        return
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    registry = FailedJobRegistry(job.origin, connection=job.connection, serializer=JSONSerializer)
    registry.add(job, ttl=job.failure_ttl, exc_string=end.exc_string, pipeline=pipe)
    Result.create_failure(job, job.failure_ttl, exc_string=end.exc_string, **common)
