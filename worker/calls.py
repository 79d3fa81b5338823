"""One delivered call, from reservation to settled message.

::

    look up the function, read the record (one read for the calls of a reserve,
      worker.reads) -> final? ack it, done -> unknown function? expired? end it
      -> submit to the agent (the reservation is extended meanwhile,
         worker.reservations), while `running` (attempt n) is recorded beside it
         if the call lasts (worker.running)
      -> decide (worker.policy) -> record durably -> settle the message (worker.recording)

A call whose record is `running` on another worker that is alive, and may
still be running it (worker.elsewhere), is left to that worker: the new
delivery is put off, as a call delivered again to the worker running it is
(``put_off_duplicate``), and its record left alone.

A call that never reached a container because the worker is stopping (the
agent sends back calls that wait for a container, and refuses new ones, at
the first stop request) goes back to the queue at once, as the calls stopped
after the grace period do: its record back to `queued` first if it was marked
`running` (only when the datastore could not be read at intake: the mark is
otherwise armed at dispatch), no attempt counted (worker.running), then its
message released with no delay.

The message is settled (acked, dead-lettered, completed) only after the
record is durable, so a crash at any point delivers the call again, and a
duplicate delivery of a finished call finds the final record and runs nothing.

A call whose message the queue buried on its own (too many lapsed
reservations, or malformed for this worker) will not be delivered again: the
intake hands it to ``record_buried`` (worker.buried), which ends a `queued`
or `running` record as an error with the queue's reason.

A call that has run waits in memory until its record is stored and its
message settled. At most ``MAX_RECORDING`` calls wait so: the intake takes no
more calls until one of them is done (``room_to_record``, worker.recording),
so a slow or unreachable datastore holds calls back in the queue instead of
in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from datetime import timedelta

from config.domain import CallStatus, FailureKind, Function, Outcome
from config.errors import FnqError, Retryable, StoreError, reason_of
from config.settings import Settings
from datastore.base import CallRecord, Datastore
from datastore.errors import StoreClosed
from mq.base import Buried
from worker.agent.agent import Agent
from worker.buried import record_buried
from worker.delivery import HAND_BACK_TIMEOUT_S, Delivery
from worker.elsewhere import Elsewhere
from worker.logs import current_call
from worker.metrics import Metrics
from worker.reads import RecordRead
from worker.recording import Recorder, outcome_of
from worker.reservations import heartbeat
from worker.running import HANDED_BACK, HANDED_BACK_UNSTARTED, RunningMark

log = logging.getLogger("fnq.worker")

FN_CACHE_TTL_S = 2.0
# Definitions the cache holds before it drops those past FN_CACHE_TTL_S (then: twice
# as many as it kept), so that it holds the functions called lately, not every name
# ever called (10,000 functions: 9 MB; names of no function grow it as well).
FN_CACHE_KEEP = 1024
# Calls that have run and wait for their outcome to be stored and their message
# settled, at most (see Recorder.room_to_record, worker.recording). A few per
# commit normally.
MAX_RECORDING = 256
RETRY_LATER_S = 5.0  # a call the datastore could not take for a passing reason waits so
HANDED_BACK_LOG_S = 30.0  # at most one warning this often for calls handed back
SETTLE_FAILED_S = 10.0  # handing such a call back (or to the dead letters) takes at most
FINAL_POLL_S = 0.05  # a stopped call's final record, read again after
HAND_BACK_RECORD_S = 2.0  # a call stopped by shutdown: putting its record back takes at most
MAX_PUT_OFF_IDS = 1000  # calls put off that are remembered (to warn once for each)


class _Unstarted(Exception):
    """The worker is stopping and the call never reached a container (see handle)."""


class CallHandler:
    def __init__(
        self,
        settings: Settings,
        store: Datastore,
        agent: Agent,
        *,
        metrics: Metrics,
        worker_id: str,
        rng: random.Random,
        max_recording: int = MAX_RECORDING,
    ) -> None:
        self.settings = settings
        self.store = store
        self.agent = agent
        self.metrics = metrics
        self.worker_id = worker_id
        self.held: dict[str, Delivery] = {}  # calls whose reservations the heartbeat extends
        self._marks: dict[str, RunningMark] = {}  # the `running` marks of held calls
        # Stores the outcomes, settles the messages, counts the calls waiting for that.
        self.recorder = Recorder(
            store, metrics=metrics, worker_id=worker_id, rng=rng, max_recording=max_recording
        )
        self._fn_cache: dict[tuple[str, str], tuple[float, Function | None]] = {}
        self._fn_cache_room = FN_CACHE_KEEP
        self._elsewhere = Elsewhere(store, worker_id)
        self._put_off_ids: dict[str, None] = {}  # calls put off so far, oldest first
        self._handed_back = 0  # calls handed back for a passing fault (see _failed)
        self._handed_back_logged_at = -HANDED_BACK_LOG_S
        self.left_to_lapse = 0  # messages left to come back as their reservations lapse
        self._lapse_logged_at = -HANDED_BACK_LOG_S

    @property
    def completed(self) -> int:
        """The calls that ended here (worker.recording)."""
        return self.recorder.completed

    @property
    def recording(self) -> int:
        """The calls that have run (or never will) and wait to be recorded."""
        return self.recorder.recording

    async def room_to_record(self) -> None:
        """Return once there is room among the calls that wait to be recorded
        (``Recorder.room_to_record``, worker.recording)."""
        await self.recorder.room_to_record()

    async def record_buried(self, buried: Sequence[Buried]) -> None:
        """End the records of calls the queue buried on its own (worker.buried)."""
        await record_buried(self.store, self.metrics, buried)

    async def heartbeat(self) -> None:
        """Extend the reservations of the held calls until cancelled (worker.reservations)."""
        await heartbeat(self.settings, self.held)

    async def handle(
        self,
        d: Delivery,
        on_start: Callable[[], None],
        launch_patience_s: float = 0.0,
        read: RecordRead | None = None,
    ) -> None:
        """Run one delivered call. ``read``: the reserve's read of its calls' records
        (worker.reads); without one, the call reads its record itself."""
        current_call.set(d.call_id)  # this task's context: every log line names the call
        self.held[d.call_id] = d  # from now on the heartbeat extends its reservation
        try:
            await self._process(d, on_start, launch_patience_s, read)
        except _Unstarted:  # the worker is stopping: the call goes back to the queue
            back = asyncio.ensure_future(self._hand_back(d, HANDED_BACK_UNSTARTED))
            try:
                await asyncio.shield(back)
            except asyncio.CancelledError:  # the grace is over meanwhile: finish it first
                await asyncio.wait({back}, timeout=HAND_BACK_RECORD_S + HAND_BACK_TIMEOUT_S)
                raise
        except asyncio.CancelledError:  # the worker stops: the call goes back to the queue
            await asyncio.shield(self._hand_back(d))
            raise
        except FnqError as exc:
            await self._failed(d, exc)
        except Exception:
            # A fault of fnq's own: the message comes back when its reservation lapses,
            # and goes to the dead letters after FN_MQ_MAX_DELIVERIES of them.
            log.exception("handling call %s failed; its message returns to the queue", d.call_id)
        finally:
            self.held.pop(d.call_id, None)
            self._marks.pop(d.call_id, None)
            self.recorder.forget(d.call_id)

    async def put_off_duplicate(self, d: Delivery) -> None:
        """A call this worker is handling came again (its reservation lapsed, say while
        the queue could not be reached, and the queue gave it back to this worker):
        the new delivery goes back for RETRY_LATER_S, its record and the running
        call left alone. When it comes back, the call has most often ended: its
        final record settles it then, and it does not run twice."""
        current_call.set(d.call_id)
        await self._put_off(d, "delivered again while it runs here")

    async def _put_off(self, d: Delivery, why: str) -> None:
        """The new delivery of a call that runs (here or on another worker) goes back
        for RETRY_LATER_S; nothing else changes. A warning the first time for a call
        (a long call comes back every RETRY_LATER_S until it ends), then at debug."""
        first = d.call_id not in self._put_off_ids
        self._put_off_ids[d.call_id] = None
        if len(self._put_off_ids) > MAX_PUT_OFF_IDS:
            del self._put_off_ids[next(iter(self._put_off_ids))]
        log.log(logging.WARNING if first else logging.DEBUG,
                "call %s: %s; the new delivery goes back for %g s",
                d.call_id, why, RETRY_LATER_S)  # fmt: skip
        try:
            async with asyncio.timeout(SETTLE_FAILED_S):
                await d.release(RETRY_LATER_S)
        except (FnqError, TimeoutError) as exc:
            log.warning("call %s: the new delivery could not be put off (%s); it returns "
                        "when its reservation lapses", d.call_id,
                        reason_of(exc, SETTLE_FAILED_S))  # fmt: skip

    async def _hand_back(self, d: Delivery, why: Outcome = HANDED_BACK) -> None:
        """Its record first, then its message: once the message is released another
        worker may take the call at once, and the record must not be moved back then."""
        if await self._withdraw(d, why) and await self._unrecorded(d):
            failed = await d.hand_back()
            if failed is None:
                self.metrics.calls.went_back("stop")
            else:
                self._left_to_lapse(d.call_id, f"handing it back failed ({failed})")

    async def _unrecorded(self, d: Delivery) -> bool:
        """Whether the call may go back to the queue: its handling was not cancelled
        while its final record was being written (a write the datastore has taken goes
        on). If it was, the record gets HAND_BACK_RECORD_S to turn up final; then the
        message is settled as it says. False when the message must stay: settled, or
        left to return when its reservation lapses (its record may still land, over
        the next worker's run: the next delivery then finds it final)."""
        final = self.recorder.final_write(d.call_id)
        if final is None:
            return True
        outcome, dead_letter = final
        record = await self._final_record(d.call_id)
        if record is None:
            self._left_to_lapse(d.call_id, "its final record is still being written")
            return False
        if record.status is not outcome.status:  # ended otherwise (cancelled): as it says
            outcome, dead_letter = outcome_of(record), False
        try:
            async with asyncio.timeout(HAND_BACK_TIMEOUT_S):
                await d.settle(outcome, dead_letter=dead_letter)
        except (FnqError, TimeoutError) as exc:
            log.warning("call %s: its record is final but its message could not be settled "
                        "(%s); it returns when its reservation lapses", d.call_id,
                        reason_of(exc, HAND_BACK_TIMEOUT_S))  # fmt: skip
        return False

    async def _final_record(self, call_id: str) -> CallRecord | None:
        """The call's record once it is final, read until HAND_BACK_RECORD_S have passed;
        None if it is not final by then (or cannot be read)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + HAND_BACK_RECORD_S
        while True:
            try:
                async with asyncio.timeout(max(0.0, give_up - loop.time())):
                    record = await self.store.get_call(call_id)
            except (FnqError, TimeoutError):
                return None
            if record is not None and record.status.is_final:
                return record
            if loop.time() + FINAL_POLL_S > give_up:
                return None
            await asyncio.sleep(FINAL_POLL_S)

    async def _withdraw(self, d: Delivery, why: Outcome, retry_in_s: float = 0.0) -> bool:
        """Before its message is released: put the call's record back to `queued` if its
        `running` mark made it so (worker.running); best effort, at most
        HAND_BACK_RECORD_S, a failure logged, not raised. False when the mark itself
        is still being written: it could land over the record of the next worker to
        take the call, so the message must wait for its reservation to lapse instead."""
        mark = self._marks.get(d.call_id)
        if mark is None or await mark.withdraw(HAND_BACK_RECORD_S, why, retry_in_s):
            return True
        self._left_to_lapse(d.call_id, "its `running` record is still being written")
        return False

    def _left_to_lapse(self, call_id: str, why: str) -> None:
        """The call's message is left to come back when its reservation lapses, ``why``.
        A warning at most every HANDED_BACK_LOG_S, with how many so far (a worker
        stopped in a datastore outage leaves up to MAX_RECORDING calls so, all at
        once); each one at debug level. The count is in the worker's last line."""
        self.left_to_lapse += 1
        now = asyncio.get_running_loop().time()
        if now - self._lapse_logged_at >= HANDED_BACK_LOG_S:
            log.warning("call %s: %s; its message returns when its reservation lapses "
                        "(%d call(s) so far)", call_id, why, self.left_to_lapse)  # fmt: skip
            self._lapse_logged_at = now
        else:
            log.debug("call %s: %s; its message returns when its reservation lapses",
                      call_id, why)  # fmt: skip

    async def _failed(self, d: Delivery, exc: FnqError) -> None:
        """The datastore or the queue failed the call's handling; nothing is lost.

        A passing fault (a read that fails in an outage, say: writes wait for the
        datastore, and a log for its store) hands the message back to run again later,
        its record put back to `queued` first if it was marked `running` (as at
        shutdown: the attempt stays counted if the function ran, worker.running).
        A record the datastore refuses sends the message to the dead
        letters with the reason, rather than running it again and again.
        Anything else leaves the message to come back when its reservation lapses.
        """
        warned = True  # the line below follows a warning about the call, or none
        try:
            async with asyncio.timeout(SETTLE_FAILED_S):
                if isinstance(exc, Retryable):
                    back = Outcome(
                        status=CallStatus.ERROR,
                        error=f"{exc}; the call went back to the queue",
                        failure=FailureKind.BUSY,
                    )
                    if await self._withdraw(d, back, RETRY_LATER_S):  # else: it said why
                        warned = self._log_handed_back(d.call_id, exc)
                        await d.release(RETRY_LATER_S)
                        self.metrics.calls.went_back("fault")
                elif isinstance(exc, StoreError) and not isinstance(exc, StoreClosed):
                    log.error("call %s: the datastore refused it (%s); its message goes to "
                              "the dead letters", d.call_id, exc)  # fmt: skip
                    await d.queue.dead_letter(d.msg, f"the datastore refused the call: {exc}")
                else:
                    log.error("call %s: %s; its message returns to the queue when its "
                              "reservation lapses", d.call_id, exc)  # fmt: skip
        except (FnqError, TimeoutError) as again:
            why = reason_of(again, SETTLE_FAILED_S)
            log.log(logging.WARNING if warned else logging.DEBUG,
                    "call %s: its message could not be handed back either (%s); it "
                    "returns when its reservation lapses", d.call_id, why)  # fmt: skip

    def _log_handed_back(self, call_id: str, exc: FnqError) -> bool:
        """A warning at most every HANDED_BACK_LOG_S (an outage hands back every call
        the worker takes, again and again), with how many went back meanwhile; each
        one at debug level. Whether it warned."""
        self._handed_back += 1
        now = asyncio.get_running_loop().time()
        if now - self._handed_back_logged_at >= HANDED_BACK_LOG_S:
            log.warning("call %s: %s; it goes back to the queue for %g s (%d call(s) so far)",
                        call_id, exc, RETRY_LATER_S, self._handed_back)  # fmt: skip
            self._handed_back_logged_at = now
            return True
        log.debug("call %s: %s; it goes back to the queue", call_id, exc)
        return False

    async def _process(
        self,
        d: Delivery,
        on_start: Callable[[], None],
        launch_patience_s: float,
        read: RecordRead | None,
    ) -> None:
        call = d.msg.call
        fn = await self._function(call.app, call.fn)
        try:
            # a read: no commit to wait for
            seen = await (self.store.get_call(call.id) if read is None else read.get(call.id))
        except StoreError as exc:
            # Reads fail at once in an outage; writes wait for the datastore. Wait
            # on the `running` write before running, then, as the outage requires.
            log.debug("reading the record of %s failed (%s): recording first", call.id, exc)
            seen = None
            reachable = False
        else:
            reachable = True
        if seen is not None and seen.status.is_final:
            with self.recorder.counted():
                await self.recorder.settle_final(d, seen)
            return
        if (
            seen is not None
            and seen.status is CallStatus.RUNNING
            and fn is not None
            and (other := await self._elsewhere.runs(seen, fn)) is not None
        ):
            await self._put_off(d, f"delivered again while worker {other} runs it")
            return
        # The call's age by the datastore's clock, as its creation time was read by
        # `fnq call` (a producer of its own reads its host's clock).
        age = self.store.clock.now() - call.created_at
        if fn is None or age > timedelta(seconds=fn.max_age_s):
            with self.recorder.counted():
                await self.recorder.finish_early(d, fn, seen)
            return
        # The `running` record (attempt n) is written while the call runs in its
        # container, and only if it lasts (worker.running): its commit is not on the
        # way to the container.
        mark = self._marks[call.id] = RunningMark(self.store, call, self.worker_id)
        if not reachable:
            mark.arm(0.0)
            record = await mark.written()
            if record is not None and record.status.is_final:
                with self.recorder.counted():
                    await self.recorder.settle_final(d, record)
                return
        delay_s = self.settings.secs("running_mark_msecs")

        def started() -> None:  # the call has reached its function
            on_start()
            mark.reached(delay_s)

        try:
            outcome = await self.agent.submit(
                call, fn, on_start=started, launch_patience_s=launch_patience_s
            )
        finally:
            mark.cancel()  # a call stopped meanwhile may still be marked (RunningMark.withdraw)
        mark.finished(outcome.started)
        if (
            not outcome.started
            and outcome.failure is FailureKind.BUSY
            and self.agent.waiting_stopped
        ):
            raise _Unstarted  # it goes back as it came, not after a delay (see handle)
        with self.recorder.counted():
            await self.recorder.record(d, fn, outcome, mark, seen)

    async def _function(self, app: str, name: str) -> Function | None:
        now = asyncio.get_running_loop().time()
        hit = self._fn_cache.get((app, name))
        if hit is not None and now - hit[0] < FN_CACHE_TTL_S:
            return hit[1]
        fn = await self.store.get_fn(app, name)
        if len(self._fn_cache) >= self._fn_cache_room:
            cache = self._fn_cache
            self._fn_cache = {k: v for k, v in cache.items() if now - v[0] < FN_CACHE_TTL_S}
            self._fn_cache_room = max(FN_CACHE_KEEP, 2 * len(self._fn_cache))
        self._fn_cache[(app, name)] = (now, fn)
        return fn
