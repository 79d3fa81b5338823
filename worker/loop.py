"""The worker: queue in, agent in the middle, datastore out.

One worker process runs one intake loop and one task per call::

    intake:  wait for room (WaitAsyncResource) and for a prefetch place
             -> reserve a message (bounded wait) -> start a call task
    call:    look up the function -> expired? unknown? -> record `running`
             -> submit to the agent (the reservation is extended meanwhile)
             -> decide (worker.policy) -> record the outcome durably -> ack,
                or hand the message back for a retry / when busy

The message is acked only after the final record is durable, so a crash at
any point leaves the message to be delivered again; a duplicate delivery of a
finished call finds the final record and is acked without running.

Prefetch: a worker holds at most ``prefetch`` calls that are reserved but not
yet running in a container. The agent tells the call task when its call has
been dispatched, which frees the place. A burst therefore queues in the
shared queue, where idle workers can take it, instead of piling onto one
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TypeVar

from config.domain import CallStatus, FailureKind, Function, Outcome, hostname_id, utcnow
from config.errors import FnqError
from config.settings import Settings
from datastore.base import Datastore
from mq.base import Message, MessageQueue
from worker.agent.agent import Agent
from worker.metrics import Metrics
from worker.policy import Action, Decision, decide
from worker.shutdown import Shutdown

log = logging.getLogger("fnq.worker")
T = TypeVar("T")

FN_CACHE_TTL_S = 2.0
OUTAGE_BACKOFF_MAX_S = 10.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        queue: MessageQueue,
        store: Datastore,
        agent: Agent,
        *,
        prefetch: int = 2,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.agent = agent
        self.worker_id = worker_id or hostname_id()
        self.prefetch = asyncio.Semaphore(max(1, prefetch))
        self.rng = rng or random.Random()
        self.metrics = metrics or Metrics()
        self.running: dict[str, asyncio.Task[None]] = {}
        self._fn_cache: dict[tuple[str, str], tuple[float, Function | None]] = {}
        self._outage_since: float | None = None
        self.completed = 0

    # ---------------------------------------------------------------- intake
    async def run(self, shutdown: Shutdown, *, burst: bool = False) -> None:
        """Take calls until ``shutdown`` (or, with ``burst``, until the queue is empty)."""
        calls: set[asyncio.Task[None]] = set()
        try:
            await self._intake(shutdown, calls, burst)
        finally:
            await self._drain(shutdown, calls)

    async def _intake(
        self, shutdown: Shutdown, calls: set[asyncio.Task[None]], burst: bool
    ) -> None:
        poll_s = self.settings.secs("async_chew_poll_msecs")
        while not shutdown.stopping.is_set():
            if not await self._until(shutdown, self.agent.wait_async_resource(poll_s)):
                continue
            if not await self._until(shutdown, self.prefetch.acquire()):
                continue
            msg = await self._reserve(shutdown, min(poll_s, 1.0) if burst else poll_s)
            if msg is None:
                self.prefetch.release()
                if burst and not calls:
                    return
                continue
            task = asyncio.create_task(self._handle(msg), name=f"fnq-call-{msg.call.id}")
            calls.add(task)
            task.add_done_callback(calls.discard)

    async def _until(self, shutdown: Shutdown, waiter: Awaitable[bool | None]) -> bool:
        """Await ``waiter`` unless shutdown comes first; True if it finished truthy."""
        task = await self._race(shutdown, waiter)
        return task is not None and task.result() is not False

    @staticmethod
    async def _race(shutdown: Shutdown, waiter: Awaitable[T]) -> asyncio.Future[T] | None:
        """Run ``waiter``; cancel it if shutdown comes first (then None)."""
        task = asyncio.ensure_future(waiter)
        stop = asyncio.ensure_future(shutdown.stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _reserve(self, shutdown: Shutdown, timeout_s: float) -> Message | None:
        # A reserve cut short by shutdown hands back what it was claiming (mq.base).
        task = await self._race(shutdown, self.queue.reserve(timeout_s))
        if task is None:
            return None
        try:
            msg = task.result()
        except FnqError as exc:
            await self._outage("queue", exc, shutdown)
            return None
        self._recovered("queue")
        return msg

    async def _outage(self, what: str, exc: Exception, shutdown: Shutdown) -> None:
        loop = asyncio.get_running_loop()
        if self._outage_since is None:
            self._outage_since = loop.time()
            log.error("%s unavailable, pausing intake: %s", what, exc)
        waited = loop.time() - self._outage_since
        delay = min(OUTAGE_BACKOFF_MAX_S, 0.2 * 2 ** min(6, int(waited)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.stopping.wait(), timeout=delay)

    def _recovered(self, what: str) -> None:
        if self._outage_since is not None:
            log.warning("%s is back, resuming intake", what)
            self._outage_since = None

    async def _drain(self, shutdown: Shutdown, calls: set[asyncio.Task[None]]) -> None:
        if not calls:
            return
        log.info("waiting for %d running call(s)", len(calls))
        grace = asyncio.ensure_future(shutdown.wait_grace())
        pending = asyncio.ensure_future(asyncio.wait(set(calls)))
        await asyncio.wait({grace, pending}, return_when=asyncio.FIRST_COMPLETED)
        grace.cancel()
        if calls:
            log.warning("grace period over: stopping %d call(s)", len(calls))
            for task in list(calls):
                task.cancel()
        await pending

    # ------------------------------------------------------------ one call
    async def _handle(self, msg: Message) -> None:
        started = asyncio.Event()
        released = False

        def on_start() -> None:
            nonlocal released
            if not released:
                released = True
                self.prefetch.release()
            started.set()

        heartbeat = asyncio.create_task(self._heartbeat(msg), name=f"fnq-hb-{msg.call.id}")
        self.running[msg.call.id] = asyncio.current_task()  # type: ignore[assignment]
        try:
            await self._process(msg, on_start)
        except asyncio.CancelledError:
            await asyncio.shield(self._hand_back(msg))
            raise
        finally:
            on_start()
            self.running.pop(msg.call.id, None)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _process(self, msg: Message, on_start: Callable[[], None]) -> None:
        call = msg.call
        fn = await self._function(call.app, call.fn)
        if fn is None:
            await self._finish_early(
                msg, f"function {call.fn_ref} is not registered", FailureKind.TERMINAL
            )
            return
        if utcnow() - call.created_at > timedelta(seconds=fn.max_age_s):
            await self._finish_early(
                msg,
                f"expired: not started within {fn.max_age_s} s of being enqueued",
                FailureKind.CANCELLED,
                CallStatus.CANCELLED,
            )
            return
        record = await self.store.record_running(call, 0, self.worker_id)
        if record.status.is_final:
            log.info("call %s already %s: acking duplicate delivery", call.id, record.status)
            await self.queue.ack(msg)
            return
        attempt = record.attempts
        outcome = await self.agent.submit(call, fn, on_start=on_start)
        decision = decide(outcome, fn, attempt, self.rng)
        await self._apply(msg, outcome, decision, attempt)

    async def _apply(
        self, msg: Message, outcome: Outcome, decision: Decision, attempt: int
    ) -> None:
        call = msg.call
        if decision.action is Action.RELEASE:
            self.metrics.released.inc()
            await self.store.record_retry(
                call, outcome, attempt - 1, utcnow() + timedelta(seconds=decision.delay_s)
            )
            await self.queue.release(msg, decision.delay_s)
            return
        self._observe(call.created_at, outcome)
        if decision.action is Action.RETRY:
            log.info(
                "call %s attempt %d failed (%s): retry in %.1f s",
                call.id,
                attempt,
                outcome.error,
                decision.delay_s,
            )
            self.metrics.retries.inc()
            await self.store.record_retry(
                call, outcome, attempt, utcnow() + timedelta(seconds=decision.delay_s)
            )
            await self.queue.release(msg, decision.delay_s)
            return
        await self.store.record_outcome(call, outcome, attempt, self.worker_id)
        if decision.dead_letter:
            await self.queue.dead_letter(msg, outcome.error or outcome.status.value)
        else:
            await self.queue.ack(msg)
        self.metrics.calls.labels(outcome.status.value).inc()
        self.completed += 1

    def _observe(self, created_at: datetime, outcome: Outcome) -> None:
        if outcome.started_at is None:
            return
        self.metrics.queue_wait.observe(max(0.0, (outcome.started_at - created_at).total_seconds()))
        if outcome.completed_at is not None:
            run_s = (outcome.completed_at - outcome.started_at).total_seconds()
            self.metrics.run_time.observe(max(0.0, run_s))

    async def _finish_early(
        self,
        msg: Message,
        error: str,
        failure: FailureKind,
        status: CallStatus = CallStatus.ERROR,
    ) -> None:
        now = utcnow()
        outcome = Outcome(status=status, error=error, failure=failure, completed_at=now)
        await self.store.record_outcome(msg.call, outcome, 0, self.worker_id)
        if failure is FailureKind.TERMINAL:
            await self.queue.dead_letter(msg, error)
        else:
            await self.queue.ack(msg)
        self.metrics.calls.labels(status.value).inc()
        self.completed += 1

    async def _hand_back(self, msg: Message) -> None:
        try:
            await asyncio.wait_for(self.queue.release(msg, 0.0), timeout=5.0)
        except (FnqError, TimeoutError) as exc:
            log.warning(
                "could not hand back %s (it returns when its reservation lapses): %s",
                msg.call.id,
                exc,
            )

    async def _heartbeat(self, msg: Message) -> None:
        every_s = self.settings.mq_reservation_msecs / 3000.0
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.wait_for(self.queue.extend(msg), timeout=every_s)
            except (FnqError, TimeoutError) as exc:
                log.warning("could not extend the reservation of %s: %s", msg.call.id, exc)

    async def _function(self, app: str, name: str) -> Function | None:
        loop = asyncio.get_running_loop()
        key = (app, name)
        hit = self._fn_cache.get(key)
        if hit is not None and loop.time() - hit[0] < FN_CACHE_TTL_S:
            return hit[1]
        fn = await self.store.get_fn(app, name)
        self._fn_cache[key] = (loop.time(), fn)
        return fn
