"""A call's outcome: stored durably, then its message settled.

::

    the agent's outcome -> decide (worker.policy)
      -> FINISH: store the final record, then settle the message
         (ack, dead letter, complete)
      -> RETRY, RELEASE: store the retry, then release the message for its delay

The handler (worker.calls) hands each call that has run, or never will (an
unknown function, an expired call, a duplicate delivery of a finished call),
to a :class:`Recorder`. A record the datastore refuses (something in it, not
an outage) ends the call as an error without its response and log, its
message dead-lettered; other errors (an outage, a closing store, the queue's)
go up to the handler.

A call that has run waits in memory until its record is stored and its
message settled. At most ``max_recording`` calls wait so (worker.calls'
``MAX_RECORDING`` by default): the intake takes no more calls until one of
them is done (``room_to_record``), so a slow or unreachable datastore holds
calls back in the queue instead of in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Iterator
from datetime import datetime, timedelta

from config.domain import (
    CallStatus,
    FailureKind,
    Function,
    Outcome,
    Response,
    frozen_map,
)
from config.errors import Retryable, StoreError
from datastore.base import CallRecord, Datastore
from datastore.errors import StoreClosed
from worker.delivery import Delivery
from worker.metrics import Metrics
from worker.policy import Action, decide
from worker.running import RunningMark

log = logging.getLogger("fnq.worker")


_DEAD_LETTERED = frozenset({CallStatus.ERROR, CallStatus.TIMEOUT})  # see settle_final


def outcome_of(record: CallRecord) -> Outcome:
    """A stored final record as an outcome (for settling a duplicate delivery): what the
    call's end gave, its kind of failure included (the RQ bridge's failure text says it)."""
    response = None
    if record.response_status is not None:
        response = Response(
            status=record.response_status,
            headers=frozen_map(record.response_headers),
            body=record.response_body or b"",
            truncated=record.response_truncated,
        )
    return Outcome(
        status=record.status,
        error=record.error,
        failure=record.failure,
        response=response,
        started_at=record.started_at,
        completed_at=record.completed_at,
    )


class Recorder:
    """Stores the outcomes of one worker's calls and settles their messages; counts
    the calls that wait for that."""

    def __init__(
        self,
        store: Datastore,
        *,
        metrics: Metrics,
        worker_id: str,
        rng: random.Random,
        max_recording: int,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.worker_id = worker_id
        self.rng = rng
        self.completed = 0
        self.max_recording = max_recording
        self.recording = 0  # calls that have run (or never will) and wait to be recorded
        self._room = asyncio.Event()  # set when `recording` has just gone down
        # Calls whose final record was being written when their handling was cancelled
        # (or is being written now): the outcome, and whether the message then goes to
        # the dead letters (see final_write).
        self._finals: dict[str, tuple[Outcome, bool]] = {}

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        """Count the call among those whose outcome waits to be stored and settled."""
        self.recording += 1
        try:
            yield
        finally:
            self.recording -= 1
            self._room.set()

    async def room_to_record(self) -> None:
        """Return once fewer than ``max_recording`` calls wait for their outcome to be
        stored and their message settled. The intake waits here before it takes more
        calls: when the datastore (or the queue) is slow or down, the calls that
        have run pile up in memory, each with its response and log, and running
        more would only add to them. No timeout: the caller is cancelled on
        shutdown."""
        while self.recording >= self.max_recording:
            self._room.clear()
            await self._room.wait()

    def final_write(self, call_id: str) -> tuple[Outcome, bool] | None:
        """If the call's final record was being written when its handling was cancelled
        (the write may still land): the outcome it writes, and whether its message goes
        to the dead letters."""
        return self._finals.get(call_id)

    def forget(self, call_id: str) -> None:
        """The call's handling is over."""
        self._finals.pop(call_id, None)

    async def settle_final(self, d: Delivery, record: CallRecord) -> None:
        """A delivery of a call whose record is final already (delivered again after
        its settle failed, pushed again under its id, cancelled while queued): its
        message goes where the call's end sent it. Every call that ends `error` or
        `timeout` goes to the dead letters, so such a delivery goes there too (under
        the call's id, it replaces the one there may be already)."""
        dead = record.status in _DEAD_LETTERED
        log.info("call %s is already %s: settling its message%s", d.call_id,
                 record.status.value, " (to the dead letters)" if dead else "")  # fmt: skip
        await d.settle(outcome_of(record), dead_letter=dead)

    async def record(
        self,
        d: Delivery,
        fn: Function,
        outcome: Outcome,
        mark: RunningMark,
        seen: CallRecord | None,
    ) -> None:
        """The call has run: store its outcome, then settle its message."""
        record = await mark.written()
        if record is not None and record.status.is_final:  # ended meanwhile (cancelled)
            await self.settle_final(d, record)
            return
        if record is not None:
            attempt, with_request = record.attempts, False
        else:  # no mark was due: the outcome is the first write of this attempt
            attempt = (seen.attempts if seen is not None else 0) + 1
            with_request = seen is None or not seen.has_request
        await self._apply(d, fn, outcome, attempt, with_request)

    async def _apply(
        self, d: Delivery, fn: Function, outcome: Outcome, attempt: int, with_request: bool
    ) -> None:
        call = d.msg.call
        decision = decide(outcome, fn, attempt, self.rng)
        if not decision.counted:  # this attempt does not count (worker.policy)
            attempt -= 1
        if decision.action is Action.FINISH:
            self._observe(call.created_at, outcome)
            # A write the datastore has taken goes on if the call is cancelled while
            # it waits for it: the entry stays for the hand-back (see final_write).
            self._finals[call.id] = (outcome, decision.dead_letter)
            try:
                stored_now = await self._store(
                    d, outcome, attempt,
                    self.store.record_outcome(
                        call, outcome, attempt, self.worker_id, with_request=with_request
                    ),
                )  # fmt: skip
            except asyncio.CancelledError:
                raise
            except BaseException:  # not written: nothing for the hand-back to wait for
                del self._finals[call.id]
                raise
            del self._finals[call.id]
            if stored_now is None:  # refused: ended by _refused
                return
            if not stored_now:
                stored = await self.store.get_call(call.id)
                if stored is not None and stored.status.is_final:  # cancelled meanwhile
                    await self.settle_final(d, stored)
                    return
            # It has ended here once its record is stored, whether or not the queue
            # takes the ack now (if not, the next delivery finds the record final).
            self.metrics.calls.ended(outcome.status.value)
            self.completed += 1
            if decision.dead_letter:
                ran = f"after {attempt} attempt(s)" if attempt else "without running"
                log.info("call %s ended %s %s: %s; its message goes to the dead letters",
                         call.id, outcome.status.value, ran,
                         outcome.error or "no reason given")  # fmt: skip
            await d.settle(outcome, dead_letter=decision.dead_letter)
            return
        if decision.action is Action.RETRY:
            log.info("call %s attempt %d failed (%s): retry in %.1f s",
                     call.id, attempt, outcome.error, decision.delay_s)  # fmt: skip
            self._observe(call.created_at, outcome)
            self.metrics.calls.retries += 1
        else:  # RELEASE: never started
            self.metrics.calls.released += 1
        next_try = self.store.clock.now() + timedelta(seconds=decision.delay_s)
        retry = self.store.record_retry(call, outcome, attempt, next_try, with_request=with_request)
        if await self._store(d, outcome, attempt, retry) is None:  # refused: ended by _refused
            return
        await d.release(decision.delay_s)

    async def _store(
        self, d: Delivery, ran: Outcome, attempt: int, write: Awaitable[bool]
    ) -> bool | None:
        """What the record ``write`` returns; None if the datastore refused the record
        (not an outage, not a closing store): ``_refused`` has then ended the call."""
        try:
            return await write
        except StoreError as exc:
            if isinstance(exc, Retryable | StoreClosed):
                raise
            refusal = exc
        await self._refused(d, ran, attempt, refusal)
        return None

    async def _refused(self, d: Delivery, ran: Outcome, attempt: int, exc: StoreError) -> None:
        """The datastore refused the call's record: something in it (not an outage).
        The call ends `error` with the reason, without its response and log, so that
        its record does not stay `queued` or `running`; its message goes to the dead
        letters. If even that record is refused, the error goes on to the handler's
        ``_failed`` (worker.calls)."""
        log.error("call %s: the datastore refused its record (%s); it ends as an error "
                  "without its response and log", d.call_id, exc)  # fmt: skip
        bare = Outcome(
            status=CallStatus.ERROR,
            error=f"the datastore refused the call's record: {exc}",
            failure=FailureKind.TERMINAL,
            container_id=ran.container_id,
            image=ran.image,
            started_at=ran.started_at,
            completed_at=ran.completed_at or self.store.clock.now(),
        )
        call = d.msg.call
        await self.store.record_outcome(call, bare, attempt, self.worker_id, with_request=False)
        await d.settle(bare, dead_letter=True)
        self.metrics.calls.ended(bare.status.value)
        self.completed += 1

    async def finish_early(self, d: Delivery, fn: Function | None, seen: CallRecord | None) -> None:
        """End a call that cannot start: its function is not registered, or it is older
        than the function's max age. It runs no attempt, so its count stays as stored."""
        call = d.msg.call
        if fn is None:
            error = f"function {call.fn_ref} is not registered"
            status, failure = CallStatus.ERROR, FailureKind.TERMINAL
        else:
            error = f"expired: not started within {fn.max_age_s} s of being enqueued"
            status, failure = CallStatus.CANCELLED, FailureKind.CANCELLED
        ended = self.store.clock.now()
        outcome = Outcome(status=status, error=error, failure=failure, completed_at=ended)
        attempts = 0 if seen is None else seen.attempts
        with_request = seen is None or not seen.has_request
        await self.store.record_outcome(
            call, outcome, attempts, self.worker_id, with_request=with_request
        )
        dead = failure is FailureKind.TERMINAL
        log.info("call %s ended %s without running: %s%s", call.id, status.value, error,
                 "; its message goes to the dead letters" if dead else "")  # fmt: skip
        await d.settle(outcome, dead_letter=dead)
        self.metrics.calls.ended(status.value)
        self.completed += 1

    def _observe(self, created_at: datetime, outcome: Outcome) -> None:
        if outcome.started_at is None:
            return
        wait_s = (outcome.started_at - created_at).total_seconds()
        self.metrics.calls.queue_wait.observe(max(0.0, wait_s))
        if outcome.completed_at is not None:
            run_s = (outcome.completed_at - outcome.started_at).total_seconds()
            self.metrics.calls.run_time.observe(max(0.0, run_s))
