"""The writes of a call's life: queued, running, its outcome or retry, a cancel,
a burial's end, a retry or reopen by hand; and its log with its outcome.

Part of the SQL datastore (datastore.common). Responses and logs are cut to
their bounds here, errors made storable (no NUL, no lone surrogate), and a
final record is never written over. With logs kept apart (an external log
store), a call's log is written before its record, so that a record never
points at a log that is missing.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timedelta
from typing import Any

from config.domain import Call, CallStatus, Outcome
from datastore import replay
from datastore.backend import SqlBackend, Write
from datastore.base import CallRecord, bound_body, bound_log
from datastore.errors import LogNotDeleted, LogRefused, StoreError
from datastore.logroom import PatientLogs
from datastore.rows import record_from_row

logs_logger = logging.getLogger("fnq.datastore.logs")

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


class CallRecording(SqlBackend):
    """The call-writing part of a SQL datastore."""

    async def record_queued(self, call: Call, image: str | None = None) -> None:
        await self._write(Write.QUEUED, self._queued_params(call, image))

    def _queued_params(self, call: Call, image: str | None) -> dict[str, Any]:
        now = self.clock.now()
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
        now = self.clock.now()
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
        params = {"id": call_id, "now": self.clock.now(), "error": CANCELLED_BY_REQUEST}
        row = await self._write(Write.CANCEL, params)
        return None if row is None else record_from_row(row)

    async def end_buried(self, call_id: str, reason: str, died_at: datetime) -> bool:
        params = {"id": call_id, "error": _storable(reason) or _DEFAULT_ERRORS[CallStatus.ERROR],
                  "now": self.clock.now(), "died_at": died_at}  # fmt: skip
        return bool(await self._write(Write.END_BURIED, params))

    async def retry_call(self, call_id: str) -> Call:
        rec = replay.retryable(call_id, await self.get_call(call_id))
        now = self.clock.now()
        if not await self._requeue(rec, now, reopen=False):  # changed meanwhile
            replay.retryable(call_id, await self.get_call(call_id))
            raise StoreError(f"call {call_id} changed while being retried; try again")
        return replay.rebuilt_call(rec, now)

    async def reopen_call(self, call_id: str) -> bool:
        rec = await self.get_call(call_id)
        if rec is None or not rec.is_final:
            return False
        return await self._requeue(rec, self.clock.now(), reopen=True)  # False: reopened meanwhile

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
        now = self.clock.now()
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


def _moved_on(record: CallRecord, running_on: str | None) -> bool:
    """A write must leave ``record`` alone: it is final, or a retry conditional on the
    call running on ``running_on`` finds it elsewhere."""
    if record.is_final:
        return True
    if running_on is None:
        return False
    return record.status is not CallStatus.RUNNING or record.worker_id != running_on
