"""What the rest of fnq sees of the datastore: records, filters, two Protocols.

A call is written four ways, each a single conditional statement so that the
status rules hold whatever order duplicate deliveries arrive in:

* ``record_queued``   insert if absent (producers; idempotent).
* ``record_running``  upsert to ``running`` unless already final.
* ``record_retry``    back to ``queued`` (or ``cancelled`` when a cancel was
  requested meanwhile) unless already final; the error stays for display. A
  worker handing a call back unfinished names itself: then only its own
  ``running`` record goes back.
* ``record_outcome``  upsert to the final state unless already final, with the
  response and (in the same transaction when logs live in the database) the log.

(``end_buried`` also ends a live record, as an error, when the queue buried its
message on its own: nothing would deliver the call again.)

The first of these writes to create a call's record also stores the request
(body, headers, priority) in the same statement; later writes never replace
it. ``retry_call`` puts a finished call back to ``queued`` from that request.

A final state is never overwritten. ``record_running`` and ``record_outcome``
are batched by a background writer (group commit): each caller's await ends
once its write is durable; during an outage writes wait and retry.

Workers also keep a row of their own in ``workers`` (``worker_heartbeat``,
``worker_gone``): these writes never wait out an outage, they fail within a
few seconds with StoreUnavailable instead.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from config.domain import CALL_ID_RE, Call, CallStatus, FailureKind, Function, Outcome
from config.settings import Settings, mask_url
from datastore.clock import StoreClock
from datastore.errors import InvalidCursor, UnsupportedURL

LIST_LIMIT_DEFAULT = 30
LIST_LIMIT_MAX = 1000
MARKER_ALLOWANCE_BYTES = 128  # room for one truncation line added by whoever truncated first


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call as the datastore holds it."""

    id: str
    app: str
    fn: str
    status: CallStatus
    created_at: datetime
    updated_at: datetime
    image: str | None = None
    error: str | None = None
    failure: FailureKind | None = None
    attempts: int = 0  # runs, as max_attempts counts them (docs/datastore.md)
    started_at: datetime | None = None  # None when the last attempt never started
    completed_at: datetime | None = None
    next_try_at: datetime | None = None
    worker_id: str | None = None
    container_id: str | None = None
    response_status: int | None = None
    response_headers: Mapping[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    response_truncated: bool = False
    log_truncated: bool = False
    stats: Mapping[str, float] = field(default_factory=dict)
    cancel_requested: bool = False
    # The request the call was made with (see ``has_request``). ``request_body`` is
    # None when no request is stored, and also in records read in bulk (list_calls,
    # record_running, request_cancel): only get_call and get_calls read the body.
    has_request: bool = False
    request_body: bytes | None = None
    request_headers: Mapping[str, str] = field(default_factory=dict)
    request_priority: int = 0

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able fields, as ``fnq calls show --json`` prints them."""

        def ts(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat(timespec="milliseconds")

        response: dict[str, Any] | None = None
        if self.response_status is not None:
            body, encoding = text_or_base64(self.response_body)
            response = {
                "status": self.response_status,
                "headers": dict(self.response_headers),
                "body": body,
                "body_encoding": encoding,
                "truncated": self.response_truncated,
            }
        request: dict[str, Any] | None = None
        if self.has_request:
            request = {
                "headers": dict(self.request_headers),
                "priority": self.request_priority,
                "body": None,  # where bodies are left out (lists)
                "body_encoding": None,
            }
            if self.request_body is not None:
                request["body"], request["body_encoding"] = text_or_base64(self.request_body)
        return {
            "id": self.id,
            "app": self.app,
            "fn": self.fn,
            "image": self.image,
            "status": self.status.value,
            "error": self.error,
            "failure": None if self.failure is None else self.failure.value,
            "attempts": self.attempts,
            "created_at": ts(self.created_at),
            "started_at": ts(self.started_at),
            "completed_at": ts(self.completed_at),
            "updated_at": ts(self.updated_at),
            "next_try_at": ts(self.next_try_at),
            "worker_id": self.worker_id,
            "container_id": self.container_id,
            "cancel_requested": self.cancel_requested,
            "log_truncated": self.log_truncated,
            "stats": dict(self.stats),
            "request": request,
            "response": response,
        }


@dataclass(frozen=True, slots=True)
class CallFilter:
    app: str | None = None
    fn: str | None = None
    status: CallStatus | None = None
    since: datetime | None = None  # created at or after
    limit: int = LIST_LIMIT_DEFAULT
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class CallPage:
    items: list[CallRecord]
    next_cursor: str | None = None  # set when more items may follow


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as its last heartbeat described it."""

    id: str
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at.isoformat(timespec="milliseconds"),
            "seen_at": self.seen_at.isoformat(timespec="milliseconds"),
            "info": dict(self.info),
        }


class LogStore(Protocol):
    async def put_log(self, call_id: str, data: bytes) -> None: ...
    async def get_log(self, call_id: str) -> bytes | None: ...
    async def delete_logs(self, call_ids: Sequence[str]) -> None: ...
    async def close(self) -> None: ...


class Datastore(Protocol):
    # The clock every stored time is read from, and compared with (datastore.clock).
    clock: StoreClock

    async def read_clock(self) -> None:
        """Read the datastore's clock again; a worker does at every heartbeat. Raises
        StoreUnavailable when the datastore cannot be reached."""
        ...

    # registry
    async def create_fn(self, fn: Function) -> Function: ...
    async def update_fn(self, app: str, name: str, **changes: Any) -> Function: ...
    async def get_fn(self, app: str, name: str) -> Function | None: ...
    async def get_fns(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Function]:
        """The functions of ``keys`` (app, name) that are registered, by key (one read)."""
        ...

    async def list_fns(self, app: str | None = None) -> list[Function]: ...
    async def delete_fn(self, app: str, name: str) -> bool: ...

    # call lifecycle
    async def record_queued(self, call: Call, image: str | None = None) -> None: ...
    async def record_running(self, call: Call, attempt: int, worker_id: str) -> CallRecord:
        """Mark the call running as ``attempt`` (0: the stored count plus one) and return
        the stored record; a final record is returned untouched."""
        ...

    async def record_outcome(
        self,
        call: Call,
        outcome: Outcome,
        attempt: int,
        worker_id: str,
        *,
        with_request: bool = False,
    ) -> bool:
        """Store the final state (False: the record was final already, nothing changed).
        The call's request goes with it for attempt 0 or ``with_request`` (no `running`
        write stored it); a stored request is never replaced."""
        ...

    async def record_retry(
        self,
        call: Call,
        outcome: Outcome,
        attempt: int,
        next_try_at: datetime,
        *,
        with_request: bool = False,
        running_on: str | None = None,
    ) -> bool:
        """Back to ``queued`` for another attempt (False: nothing changed). With
        ``running_on`` (a worker handing the call back unfinished), only while the call
        is still `running` on that worker: a record that has moved on is left alone.
        An attempt that never started leaves the stored log as it is."""
        ...

    async def get_call(self, call_id: str) -> CallRecord | None: ...
    async def get_calls(self, call_ids: Sequence[str]) -> dict[str, CallRecord]:
        """The records of those of ``call_ids`` that have one, by id (one read)."""
        ...

    async def list_calls(self, f: CallFilter) -> CallPage: ...
    async def count_by_status(
        self, app: str | None = None, fn: str | None = None, *, at_most: int | None = None
    ) -> dict[CallStatus, int]:
        """The calls by status (of ``app``, and ``fn`` of it, when given). Without
        ``at_most`` every call is read. With it, each status's count reads that
        status's index up to ``at_most + 1`` calls: a count above ``at_most`` stands
        for "more than ``at_most``" (with ``app`` or ``fn`` each call read is checked
        against them, so a status with few calls of theirs reads more)."""
        ...

    async def purge_calls(self, older_than: timedelta) -> int: ...
    async def request_cancel(self, call_id: str) -> CallRecord | None: ...
    async def end_buried(self, call_id: str, reason: str, died_at: datetime) -> bool:
        """End a `queued` or `running` record as an error (``reason``, failure
        `terminal`): the queue buried the call's message at ``died_at`` (by ``clock``,
        as the records' times are), so nothing will run it again. A record changed
        after ``died_at`` is left alone, and none is created. Returns whether the
        record changed."""
        ...

    async def retry_call(self, call_id: str) -> Call:
        """Put a finished call back to ``queued`` as if new (attempts 0, outcome, log and
        cancel flag cleared, request kept) and return the Call to push, rebuilt from its
        stored request with created_at = now. Raises CallNotFound, CallNotFinal (queued
        or running) or RequestNotStored; LogNotDeleted when the call's old log could
        not be deleted from an external log store (the record is left as it was)."""
        ...

    async def reopen_call(self, call_id: str) -> bool:
        """Put a finished call back to ``queued`` as ``retry_call`` does, for a caller
        that pushes the call's message itself (a requeued dead letter), so the stored
        request is not needed. False when there is no record or it is not final;
        LogNotDeleted as for ``retry_call``."""
        ...

    async def cancel_requested(self, call_ids: Sequence[str]) -> set[str]:
        """Those of ``call_ids`` with a cancel requested, or already cancelled (a call
        cancelled while its record was still `queued`); one query, a read, so
        StoreUnavailable at once during an outage."""
        ...

    async def get_log(self, call_id: str) -> bytes | None: ...

    # live workers
    async def worker_heartbeat(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Upsert this process's row (seen_at = now). Never waits out an outage: raises
        StoreUnavailable within ``WORKER_WRITE_TIMEOUT_S``, for the caller to log."""
        ...

    async def worker_gone(self, worker_id: str) -> None: ...
    async def list_workers(self, seen_within: timedelta) -> list[WorkerInfo]: ...
    async def prune_workers(self, older_than: timedelta) -> int: ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------ helpers


def text_or_base64(data: bytes) -> tuple[str, str]:
    """``(text, "utf-8")`` when ``data`` is UTF-8, else ``(base64, "base64")``."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode(), "base64"


def truncation_marker(limit_bytes: int) -> bytes:
    return f"\n[fnq: log truncated at {limit_bytes} bytes]\n".encode()


def bound_log(data: bytes, limit_bytes: int) -> bytes:
    """At most ``limit_bytes`` plus one marker line; a log already cut upstream is kept."""
    if len(data) <= limit_bytes + MARKER_ALLOWANCE_BYTES:
        return data
    return data[:limit_bytes] + truncation_marker(limit_bytes)


def bound_body(body: bytes, limit_bytes: int) -> tuple[bytes, bool]:
    """``(body, truncated)`` with the body cut to ``limit_bytes`` (0 = no limit)."""
    if limit_bytes and len(body) > limit_bytes:
        return body[:limit_bytes], True
    return body, False


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(created_at: datetime, call_id: str) -> str:
    """Where a page of calls (newest first) ended: the last call's time and id."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}~{call_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        micros, call_id = raw.split("~", 1)
        created_at = _EPOCH + timedelta(microseconds=int(micros))
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidCursor(cursor) from None
    if not CALL_ID_RE.fullmatch(call_id):
        raise InvalidCursor(cursor)
    return created_at, call_id


def clamp_limit(limit: int) -> int:
    return max(1, min(LIST_LIMIT_MAX, limit))


async def open_log_store(settings: Settings) -> LogStore | None:
    """The external log store named by FN_LOG_URL, or None for the datastore's own table."""
    if not settings.log_url:
        return None
    parts = urlsplit(settings.log_url)
    shown = mask_url(settings.log_url)
    if parts.scheme == "file":
        from datastore.filelogs import FileLogStore  # noqa: PLC0415 - chosen by URL

        path = unquote(parts.path, errors="surrogateescape")  # %XX not UTF-8: that byte
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or "\x00" in path:
            raise UnsupportedURL(
                f"FN_LOG_URL={shown!r}: a log directory URL is file:///ABSOLUTE/DIR,"
                " with no host and no options"
            )
        return FileLogStore(path)
    raise UnsupportedURL(
        f"FN_LOG_URL={shown!r}: unsupported scheme {parts.scheme!r} "
        "(use file:///DIR, or leave it empty to keep logs in the datastore)"
    )


async def open_datastore(
    settings: Settings, *, create: bool = True, write_patience_s: float | None = None
) -> Datastore:
    """Open the datastore named by FN_DB_URL, applying pending schema migrations.

    A SQLite file that does not exist is created, unless ``create`` is false
    (commands that only read): then StoreError says there is none. Writes wait
    out an outage (a worker keeps what it ran until it is stored); with
    ``write_patience_s``, a write that could not be made for that long fails
    with StoreUnavailable instead (a command, whose user waits).
    """
    scheme = urlsplit(settings.db_url).scheme
    logs = await open_log_store(settings)
    if scheme == "sqlite":
        from datastore.sqlite import SqliteDatastore  # noqa: PLC0415 - chosen by URL

        lite = await SqliteDatastore.open(settings, logs, create=create)
        lite.give_up_writes_after(write_patience_s)
        return lite
    if scheme in {"postgresql", "postgres"}:
        from datastore.postgres import PostgresDatastore  # noqa: PLC0415 - chosen by URL

        pg = await PostgresDatastore.open(settings, logs)
        pg.give_up_writes_after(write_patience_s)
        return pg
    if logs is not None:
        await logs.close()
    raise UnsupportedURL(
        f"FN_DB_URL: unsupported scheme {scheme!r} (use sqlite:///PATH or postgresql://...)"
    )
