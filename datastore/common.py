"""The datastore's rules, written once above the SQL backends.

A backend supplies four things: ``_write`` (one named write, batched into a
group-commit transaction), ``_write_now`` (one write in a transaction of its
own that fails rather than waits out an outage), ``_fetch`` (a read, times
decoded to aware datetimes) and ``_close_backend``. Everything else —
validation, log and response bounds, paging, where logs go — lives here.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from config.domain import Call, CallStatus, Function, Outcome, utcnow
from config.settings import Settings
from datastore import replay, sql
from datastore.base import (
    CallFilter,
    CallPage,
    CallRecord,
    LogStore,
    WorkerInfo,
    bound_body,
    bound_log,
    clamp_limit,
    decode_cursor,
    encode_cursor,
)
from datastore.batch import GroupCommit
from datastore.errors import (
    FunctionExists,
    FunctionNotFound,
    LogNotDeleted,
    LogRefused,
    StoreClosed,
    StoreError,
    StoreUnavailable,
)
from datastore.logroom import PatientLogs
from datastore.rows import fn_from_row, fn_row, record_from_row, worker_from_row
from datastore.validate import apply_changes, validate_function

logs_logger = logging.getLogger("fnq.datastore.logs")

CLOSE_TIMEOUT_S = 10.0
PURGE_CHUNK = 500
# The calls a page of a list reads at most when no one index holds all of its filters.
LIST_WALK_MAX = 100_000
WORKER_WRITE_TIMEOUT_S = 5.0  # a heartbeat gives up after this; the next one tries again

_DEFAULT_ERRORS = {
    CallStatus.ERROR: "The call failed.",
    CallStatus.TIMEOUT: "The call ran past its function's timeout.",
    CallStatus.CANCELLED: "The call was cancelled.",
}
CANCELLED_BY_REQUEST = "The call was cancelled on request before it started."


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str | None) -> str | None:
    """``text`` with each NUL character and lone surrogate replaced by U+FFFD:
    PostgreSQL's text type cannot hold NUL, no UTF-8 text holds a surrogate (bytes
    that were not UTF-8), and every backend stores the same text."""
    return _UNSTORABLE.sub("\ufffd", text) if text else text


class Write(StrEnum):
    """The writes a backend must know how to run inside a batch transaction."""

    FN_INSERT = "fn_insert"  # -> bool (False: already exists)
    FN_UPDATE = "fn_update"  # -> bool (False: no such function)
    FN_DELETE = "fn_delete"  # -> bool
    QUEUED = "queued"  # -> None
    RUNNING = "running"  # -> stored row (dict)
    FINISH = "finish"  # -> bool (False: already final); log stored alongside if given
    RETRY = "retry"  # -> bool; log stored alongside if given
    CANCEL = "cancel"  # -> stored row or None
    END_BURIED = "end_buried"  # -> bool (False: no live record from before the burial)
    REQUEUE = "requeue"  # -> bool (False: not final, or no request unless :reopen); log deleted
    PURGE = "purge"  # -> list of deleted ids (their logs go by cascade)
    PURGE_IDS = "purge_ids"  # -> list of deleted ids among :ids (still ended before :cutoff)
    LOG_PUT = "log_put"  # -> None
    LOG_DELETE = "log_delete"  # -> None (params: call_ids)
    # not batched: through _write_now
    WORKER_BEAT = "worker_beat"  # -> None
    WORKER_GONE = "worker_gone"  # -> bool
    WORKER_PRUNE = "worker_prune"  # -> int (rows deleted)


class SqlDatastore(abc.ABC):
    """The Datastore protocol for SQL backends; subclasses only store."""

    # How the backend matches ``id`` against the list parameter ``:ids``.
    IDS_IN: ClassVar[str] = "= ANY(:ids)"
    # The ids of the next chunk of ended calls completed before ``:cutoff``, oldest first.
    PURGE_CHUNK_IDS: ClassVar[str] = sql.purge_chunk_ids("status")
    writer: GroupCommit[Any]  # the backend's batches
    # The functions named by the parameters of ``_fn_keys``, each found by its key.
    FNS_GET: ClassVar[str] = (
        "SELECT fns.* FROM unnest(CAST(:apps AS text[]), CAST(:names AS text[])) AS k (app, name)"
        " JOIN fns ON fns.app = k.app AND fns.name = k.name"
    )

    def __init__(self, settings: Settings, logs: LogStore | None) -> None:
        self.settings = settings
        self._external_logs = logs
        # The external store's log writes, each waiting until the store can take it.
        self._log_room = None if logs is None else PatientLogs(logs)
        self.close_timeout_s = CLOSE_TIMEOUT_S
        self.worker_write_timeout_s = WORKER_WRITE_TIMEOUT_S
        self._closed = False

    # ------------------------------------------------------ backend hooks
    @abc.abstractmethod
    async def _write(self, kind: Write, params: dict[str, Any], log: bytes | None = None) -> Any:
        """Run one write in the next batch transaction; return once it is durable."""

    @abc.abstractmethod
    async def _write_now(self, kind: Write, params: dict[str, Any]) -> Any:
        """Run one write now in a transaction of its own, outside the batches; raise
        StoreUnavailable rather than wait when the database cannot be reached."""

    def _id_list(self, ids: Sequence[str]) -> Any:
        """``ids`` as the ``:ids`` parameter of ``IDS_IN``."""
        return list(ids)

    @abc.abstractmethod
    async def _fetch(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one read; time columns come back as aware datetimes."""

    async def _fetch_one(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """A read of a few rows by their keys (a backend may have a quicker way)."""
        return await self._fetch(query, params)

    @abc.abstractmethod
    async def _close_backend(self) -> None: ...

    def give_up_writes_after(self, seconds: float | None) -> None:
        """A write (a batch, a call's log) that could not be made for ``seconds`` fails
        with StoreUnavailable; None: it waits as long as the outage lasts."""
        self.writer.give_up_after_s = seconds
        if self._log_room is not None:
            self._log_room.give_up_after_s = seconds

    @property
    def logs(self) -> LogStore:
        """Where call logs live: the external store, or this database's own table."""
        return self._external_logs or TableLogStore(self)

    # ------------------------------------------------------------ registry
    async def create_fn(self, fn: Function) -> Function:
        now = utcnow()
        fn = dataclasses.replace(validate_function(fn), created_at=now, updated_at=now)
        if not await self._write(Write.FN_INSERT, fn_row(fn)):
            raise FunctionExists(fn.app, fn.name)
        return fn

    async def update_fn(self, app: str, name: str, **changes: Any) -> Function:
        current = await self.get_fn(app, name)
        if current is None:
            raise FunctionNotFound(app, name)
        fn = dataclasses.replace(apply_changes(current, changes), updated_at=utcnow())
        if not await self._write(Write.FN_UPDATE, fn_row(fn)):
            raise FunctionNotFound(app, name)
        return fn

    async def get_fn(self, app: str, name: str) -> Function | None:
        rows = await self._fetch(sql.FN_GET, {"app": app, "name": name})
        return fn_from_row(rows[0]) if rows else None

    async def get_fns(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Function]:
        if not keys:
            return {}
        rows = await self._fetch(self.FNS_GET, self._fn_keys(keys))
        found = (fn_from_row(row) for row in rows)
        return {(fn.app, fn.name): fn for fn in found}

    def _fn_keys(self, keys: Collection[tuple[str, str]]) -> dict[str, Any]:
        """``keys`` as the parameters of ``FNS_GET``."""
        return {"apps": [app for app, _ in keys], "names": [name for _, name in keys]}

    async def list_fns(self, app: str | None = None) -> list[Function]:
        if app is None:
            rows = await self._fetch(sql.FN_LIST, {})
        else:
            rows = await self._fetch(sql.FN_LIST_APP, {"app": app})
        return [fn_from_row(row) for row in rows]

    async def delete_fn(self, app: str, name: str) -> bool:
        return bool(await self._write(Write.FN_DELETE, {"app": app, "name": name}))

    # -------------------------------------------------------- call lifecycle
    async def record_queued(self, call: Call, image: str | None = None) -> None:
        await self._write(Write.QUEUED, self._queued_params(call, image))

    def _queued_params(self, call: Call, image: str | None) -> dict[str, Any]:
        now = utcnow()
        # A delayed call says when it may start, as a retry says when it is tried again.
        next_try_at = now + timedelta(seconds=call.delay_s) if call.delay_s > 0 else None
        return {"id": call.id, "app": call.app, "fn": call.fn, "image": image,
                "status": CallStatus.QUEUED.value, "attempts": 0,
                "created_at": call.created_at, "updated_at": now,
                "next_try_at": next_try_at, **self._request(call)}  # fmt: skip

    async def record_running(self, call: Call, attempt: int, worker_id: str) -> CallRecord:
        params = self._running_params(call, attempt, worker_id)
        return record_from_row(await self._write(Write.RUNNING, params))

    def _running_params(self, call: Call, attempt: int, worker_id: str) -> dict[str, Any]:
        now = utcnow()
        return {"id": call.id, "app": call.app, "fn": call.fn,
                "status": CallStatus.RUNNING.value, "attempts": max(attempt, 1),
                "attempt_arg": attempt,
                "created_at": call.created_at, "started_at": now, "updated_at": now,
                "worker_id": worker_id, **self._request(call)}  # fmt: skip

    def _request(self, call: Call) -> dict[str, Any]:
        return replay.request_params(call, self.settings.max_request_size)

    async def record_outcome(
        self,
        call: Call,
        outcome: Outcome,
        attempt: int,
        worker_id: str,
        *,
        with_request: bool = False,
    ) -> bool:
        if not outcome.status.is_final:
            raise ValueError(f"record_outcome needs a final status, not {outcome.status}")
        row, log = self._outcome_row(
            call, outcome, attempt, worker_id, outcome.status,
            with_request=with_request or attempt == 0,
        )  # fmt: skip
        return await self._store_with_log(Write.FINISH, row, log)

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
        row, log = self._outcome_row(
            call, outcome, attempt, running_on, CallStatus.QUEUED,
            with_request=with_request or attempt == 0,
        )  # fmt: skip
        row["next_try_at"] = next_try_at
        row["completed_at"] = None
        # An attempt that never started has no log: the last run's stays, and with it
        # whether that log was cut (keep_log: a parameter, not a column).
        kept = log if outcome.started or log else None
        row["keep_log"] = kept is None
        return await self._store_with_log(Write.RETRY, row, kept, running_on=running_on)

    async def request_cancel(self, call_id: str) -> CallRecord | None:
        params = {"id": call_id, "now": utcnow(), "error": CANCELLED_BY_REQUEST}
        row = await self._write(Write.CANCEL, params)
        return None if row is None else record_from_row(row)

    async def end_buried(self, call_id: str, reason: str, died_at: datetime) -> bool:
        params = {"id": call_id, "error": _storable(reason) or _DEFAULT_ERRORS[CallStatus.ERROR],
                  "now": utcnow(), "died_at": died_at}  # fmt: skip
        return bool(await self._write(Write.END_BURIED, params))

    async def retry_call(self, call_id: str) -> Call:
        rec = replay.retryable(call_id, await self.get_call(call_id))
        now = utcnow()
        if not await self._requeue(rec, now, reopen=False):  # changed meanwhile
            replay.retryable(call_id, await self.get_call(call_id))
            raise StoreError(f"call {call_id} changed while being retried; try again")
        return replay.rebuilt_call(rec, now)

    async def reopen_call(self, call_id: str) -> bool:
        rec = await self.get_call(call_id)
        if rec is None or not rec.is_final:
            return False
        return await self._requeue(rec, utcnow(), reopen=True)  # False: reopened meanwhile

    async def _requeue(self, rec: CallRecord, now: datetime, *, reopen: bool) -> bool:
        """Put the final call ``rec`` back to ``queued`` (its image the function's current
        one) and drop its log; False if it was no longer final. Without ``reopen`` only
        a call whose request is stored."""
        fn = await self.get_fn(rec.app, rec.fn)
        params = {"id": rec.id, "now": now, "image": None if fn is None else fn.image}
        if self._external_logs is not None:
            # The old log goes first: a record reopened while it stayed would show it
            # as the log of the coming run. Not deleted, the call stays as it was.
            try:
                await self._external_logs.delete_logs([rec.id])
            except StoreError as exc:
                raise LogNotDeleted(f"{exc}; call {rec.id} stays {rec.status.value}") from exc
        return bool(await self._write(Write.REQUEUE, {**params, "reopen": reopen}))

    def _outcome_row(
        self,
        call: Call,
        outcome: Outcome,
        attempt: int,
        worker_id: str | None,
        status: CallStatus,
        *,
        with_request: bool,
    ) -> tuple[dict[str, Any], bytes]:
        now = utcnow()
        log = bound_log(outcome.log, self.settings.max_log_size_bytes)
        resp = outcome.response
        body, cut = bound_body(resp.body, self.settings.max_response_size) if resp else (b"", False)
        row: dict[str, Any] = {
            "id": call.id, "app": call.app, "fn": call.fn, "image": outcome.image,
            "status": status.value,
            "error": _storable(outcome.error) or _DEFAULT_ERRORS.get(outcome.status),
            "failure": None if outcome.failure is None else outcome.failure.value,
            "attempts": attempt, "created_at": call.created_at,
            "started_at": outcome.started_at, "completed_at": outcome.completed_at or now,
            "updated_at": now, "next_try_at": None, "worker_id": worker_id,
            "container_id": outcome.container_id,
            "response_status": resp.status if resp else None,
            "response_headers": json.dumps(dict(resp.headers)) if resp else None,
            "response_body": body if resp else None,
            "response_truncated": bool(resp and (resp.truncated or cut)),
            "log_truncated": outcome.log_truncated or len(log) < len(outcome.log),
            "stats": json.dumps(dict(outcome.stats)),
            "cancel_requested": False,
            # no `running` write stored the request (the call never ran, or ended
            # before its mark was due): this one does, unless one is stored already
            **(self._request(call) if with_request else replay.NO_REQUEST),
        }  # fmt: skip
        return row, log

    async def _store_with_log(
        self,
        kind: Write,
        row: dict[str, Any],
        log: bytes | None,
        *,
        running_on: str | None = None,
    ) -> bool:
        """Write ``row`` and, unless None, its log. ``running_on``: the conditional retry
        of a worker handing the call back (see ``record_retry``)."""
        room = self._log_room
        if room is None:
            return bool(await self._write(kind, row, log))
        # The log goes first so that a record never points at a log that is missing;
        # a call already final (or not this worker's any more) is left alone, log included.
        existing = await self.get_call(row["id"])
        if existing is not None and _moved_on(existing, running_on):
            return False
        if log is None:
            return bool(await self._write(kind, row))
        # A log the store cannot take for now (no room, a read-only disk...) waits
        # until it can, and the record with it (datastore.logroom).
        return await room.keep(self._log_then_record(room, kind, row, log))

    async def _log_then_record(
        self, room: PatientLogs, kind: Write, row: dict[str, Any], log: bytes
    ) -> bool:
        try:
            await room.put_log(row["id"], log)
        except LogRefused as exc:
            # No wait would store it, and the call has run: its outcome is kept, its
            # log marked cut (all of it).
            logs_logger.error(  # noqa: TRY400 - the reason is all there is to say
                "%s; the call's record is stored without it", exc
            )
            row = {**row, "log_truncated": True}
        return bool(await self._write(kind, row))

    # ------------------------------------------------------------- reading
    async def get_call(self, call_id: str) -> CallRecord | None:
        rows = await self._fetch_one(sql.CALL_GET, {"id": call_id})
        return record_from_row(rows[0]) if rows else None

    async def get_calls(self, call_ids: Sequence[str]) -> dict[str, CallRecord]:
        if not call_ids:
            return {}
        query = sql.CALLS_GET.format(ids_in=self.IDS_IN)
        rows = await self._fetch_one(query, {"ids": self._id_list(call_ids)})
        records = (record_from_row(row) for row in rows)
        return {record.id: record for record in records}

    async def list_calls(self, f: CallFilter) -> CallPage:
        """A page of calls, newest first.

        When no one listing index holds all of the filters, the page walks the index
        of some of them and checks the others on each call it reads, down to the
        ``LIST_WALK_MAX``-th call of that index at most: the page may then hold fewer
        than ``f.limit`` calls and still have a cursor, that of the last call it read.
        That call is found first, so that calls written meanwhile are read or not,
        but never skipped."""
        before = decode_cursor(f.cursor) if f.cursor else None
        limit = clamp_limit(f.limit)
        status = None if f.status is None else CallStatus(f.status).value
        values = {"app": f.app, "fn": f.fn, "status": status}
        given = frozenset(name for name, value in values.items() if value is not None)
        walked = sql.walked_filters(given, status)
        on = {name: value if name in walked else None for name, value in values.items()}
        where, params = sql.call_filters(on["app"], on["fn"], on["status"], f.since, before)
        if walked == given:  # one index holds them all: the page reads its own calls only
            query = f"SELECT {sql.RECORD_SELECT} FROM calls{where}{_NEWEST_FIRST} LIMIT :limit"
            rows = await self._fetch(query, {**params, "limit": limit + 1})
            return _page(rows, limit, None)
        index = sql.LISTING_INDEXES[walked]
        found = await self._fetch(
            f"SELECT created_at, id FROM {self._walking(index)}{where}{_NEWEST_FIRST}"
            " LIMIT 1 OFFSET :skip",
            {**params, "skip": LIST_WALK_MAX - 1},
        )
        edge = (found[0]["created_at"], found[0]["id"]) if found else None
        where, params = sql.call_filters(f.app, f.fn, status, f.since, before, down_to=edge)
        params["limit"] = limit + 1
        query = (
            f"SELECT {sql.RECORD_SELECT} FROM {self._walking(index)}{where}{_NEWEST_FIRST}"
            " LIMIT :limit"
        )
        return _page(await self._fetch(query, params), limit, edge)

    def _walking(self, index: str) -> str:
        """The FROM of a read that walks ``index``. A planner with statistics may walk
        another listing index instead: each holds created_at after its filters, so
        the page reads at most the calls down to the edge's time, in any of them."""
        return "calls"

    async def count_by_status(
        self, app: str | None = None, fn: str | None = None, *, at_most: int | None = None
    ) -> dict[CallStatus, int]:
        where, params = sql.call_filters(app, fn, None, None, None)
        if at_most is None:  # every call of the table (or of the app) is read
            query = f"SELECT status, COUNT(*) AS n FROM calls{where} GROUP BY status"
        else:  # each status's count stops at at_most + 1: a bounded walk of its index
            also = where.replace(" WHERE ", " AND ", 1)
            query = " UNION ALL ".join(
                f"SELECT '{s.value}' AS status, COUNT(*) AS n FROM (SELECT 1 AS one FROM calls"
                f" WHERE status = '{s.value}'{also} LIMIT :cap) AS {s.value}_calls"
                for s in CallStatus
            )
            params["cap"] = at_most + 1
        rows = await self._fetch(query, params)
        counts = dict.fromkeys(CallStatus, 0)
        for row in rows:
            counts[CallStatus(row["status"])] = int(row["n"])
        return counts

    async def get_log(self, call_id: str) -> bytes | None:
        if self._external_logs is not None:
            return await self._external_logs.get_log(call_id)
        rows = await self._fetch(sql.LOG_GET, {"call_id": call_id})
        return bytes(rows[0]["data"]) if rows else None

    async def cancel_requested(self, call_ids: Sequence[str]) -> set[str]:
        if not call_ids:
            return set()
        query = sql.CANCEL_LOOKUP.format(ids_in=self.IDS_IN)
        rows = await self._fetch(query, {"ids": self._id_list(call_ids)})
        return {row["id"] for row in rows}

    # -------------------------------------------------------- live workers
    async def worker_heartbeat(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Upsert the worker's row with seen_at = now.

        ``host`` and ``pid`` are this process's unless ``info`` carries them; the
        rest of ``info`` is stored as JSON (values JSON cannot hold become strings).
        Not batched and never waits out an outage: any failure is a StoreError
        raised within ``worker_write_timeout_s`` (StoreUnavailable when the database
        cannot be reached, StoreClosed after close), for the caller to log.
        """
        details = dict(info)
        host, pid = details.pop("host", None), details.pop("pid", None)
        params = {
            "id": worker_id,
            "host": host if isinstance(host, str) and host else socket.gethostname(),
            "pid": pid if isinstance(pid, int) else os.getpid(),
            "now": utcnow(),
            "info": json.dumps(details, sort_keys=True, default=str),
        }
        await self._worker_write(Write.WORKER_BEAT, params)

    async def worker_gone(self, worker_id: str) -> None:
        """Delete the worker's row (clean shutdown); fails like ``worker_heartbeat``."""
        await self._worker_write(Write.WORKER_GONE, {"id": worker_id})

    async def list_workers(self, seen_within: timedelta) -> list[WorkerInfo]:
        """Workers whose last heartbeat is at most ``seen_within`` old, by host and id."""
        rows = await self._fetch(sql.WORKER_LIST, {"since": utcnow() - seen_within})
        return [worker_from_row(row) for row in rows]

    async def prune_workers(self, older_than: timedelta) -> int:
        """Delete workers not seen for ``older_than`` (they died); return how many."""
        cutoff = utcnow() - older_than
        return int(await self._worker_write(Write.WORKER_PRUNE, {"cutoff": cutoff}))

    async def _worker_write(self, kind: Write, params: dict[str, Any]) -> Any:
        if self._closed:
            raise StoreClosed()
        try:
            return await asyncio.wait_for(
                self._write_now(kind, params), self.worker_write_timeout_s
            )
        except TimeoutError:
            raise StoreUnavailable(
                f"the datastore did not answer within {self.worker_write_timeout_s:g} s"
            ) from None

    # ----------------------------------------------------------- retention
    async def purge_calls(self, older_than: timedelta) -> int:
        cutoff = utcnow() - older_than
        if self._external_logs is not None:
            return await self._purge_logs_first(self._external_logs, cutoff)
        total = 0
        while True:  # each chunk's logs go with its records, by cascade
            ids: list[str] = await self._write(
                Write.PURGE, {"cutoff": cutoff, "limit": PURGE_CHUNK}
            )
            total += len(ids)
            if len(ids) < PURGE_CHUNK:
                return total

    async def _purge_logs_first(self, logs: LogStore, cutoff: datetime) -> int:
        """Purge with logs kept apart: each chunk's logs are deleted before its records.
        A failure leaves those records (some perhaps without their log, harmless for a
        call on its way out) for a later purge to take again; never a log that no
        record leads to."""
        total = 0
        while True:
            chunk = await self._fetch(
                self.PURGE_CHUNK_IDS, {"cutoff": cutoff, "limit": PURGE_CHUNK}
            )
            ids = [row["id"] for row in chunk]
            if ids:
                await logs.delete_logs(ids)
                # A call reopened meanwhile is no longer ended, and stays.
                params = {"ids": self._id_list(ids), "cutoff": cutoff}
                total += len(await self._write(Write.PURGE_IDS, params))
            if len(ids) < PURGE_CHUNK:
                return total

    async def close(self) -> None:
        """Flush pending writes (within ``close_timeout_s``) and let go; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._log_room is not None:
                # Logs still waiting are given up first: their records could
                # not follow them into batches that are closing.
                self._log_room.close()
            await self._close_backend()
        finally:
            if self._external_logs is not None:
                await self._external_logs.close()


_NEWEST_FIRST = " ORDER BY created_at DESC, id DESC"


def _page(rows: list[dict[str, Any]], limit: int, edge: tuple[datetime, str] | None) -> CallPage:
    """The page of the first ``limit`` of ``rows`` (read with ``limit + 1``); ``edge``:
    the last call its walk read, when the walk stopped short of the end."""
    items = [record_from_row(row) for row in rows[:limit]]
    if len(rows) > limit:
        return CallPage(items, encode_cursor(items[-1].created_at, items[-1].id))
    return CallPage(items, None if edge is None else encode_cursor(*edge))


def _moved_on(record: CallRecord, running_on: str | None) -> bool:
    """A write must leave ``record`` alone: it is final, or a retry conditional on the
    call running on ``running_on`` finds it elsewhere."""
    if record.is_final:
        return True
    if running_on is None:
        return False
    return record.status is not CallStatus.RUNNING or record.worker_id != running_on


class TableLogStore:
    """The LogStore view of a SQL datastore's own ``logs`` table.

    A log row belongs to a call row (deleting the call deletes its log), so
    ``put_log`` needs the call to be recorded first.
    """

    def __init__(self, store: SqlDatastore) -> None:
        self._store = store

    async def put_log(self, call_id: str, data: bytes) -> None:
        limit = self._store.settings.max_log_size_bytes
        params = {"call_id": call_id, "data": bound_log(data, limit)}
        await self._store._write(Write.LOG_PUT, params)

    async def get_log(self, call_id: str) -> bytes | None:
        return await self._store.get_log(call_id)

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        await self._store._write(Write.LOG_DELETE, {"call_ids": list(call_ids)})

    async def close(self) -> None:
        return None
