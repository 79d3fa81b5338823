"""The worker: queues in, agent in the middle, datastore out.

One worker process runs one intake loop per queue (the main queue, and the
RQ queues when configured) and one task per call::

    intake:  wait for room among the calls that wait to be recorded
             (worker.recording), for room (WaitAsyncResource) and for a prefetch place
             -> reserve a message (bounded wait, shutdown interrupts it)
             -> start a call task (worker.calls)
             (a reserve that fails, even of a fault of the backend's own, pauses
             that intake as an outage does; the worker goes on)
             -> the calls the reserve buried (too many deliveries, malformed):
                their records end as errors, in the background (worker.buried)

Prefetch: a worker holds at most ``prefetch`` calls that are reserved but not
yet running in a container, across all its queues. The agent tells the call
task when its call has been dispatched, which frees the place. A burst
therefore stays in the shared queue, where idle workers can take it, instead
of piling onto one worker. One reserve fills every free place at once
(``reserve_many``) and carries the acks of calls finished meanwhile; acks
that no reserve takes share round trips of their own (worker.acks). The
reservations of all running calls are extended by one heartbeat task
(worker.reservations).

Extra calls: when the last reserve brought several calls, the next one also
asks for one call per container of their functions that is free, beyond the
calls already headed for them; at most ``MAX_EXTRA``. For one function a
container about to be free counts too (busy with a call of under
``SHORT_CALL_S``); for several, only idle ones do, since the next calls may
be of any of them. These hold no place. They wait up to ``EXTRA_PATIENCE_S``
for a container before they ask for a new one, so that they use the
containers they were taken for. In a burst of short functions this takes
several calls per round trip.

Shutdown (worker.shutdown): intake stops at once, and so does waiting for
containers: the calls not yet in one go back to the queue at once
(``Agent.stop_waiting``, worker.calls); calls in containers get the grace
period; what is still running after it is cancelled and handed back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from config.domain import hostname_id
from config.errors import FnqError
from config.settings import Settings
from datastore.base import Datastore
from mq.base import Message, MessageQueue
from mq.errors import QueueError
from worker.acks import AckBatcher
from worker.agent.agent import Agent
from worker.calls import MAX_RECORDING, CallHandler
from worker.delivery import Delivery
from worker.metrics import Metrics
from worker.places import Places
from worker.reads import RecordRead
from worker.shutdown import Shutdown

log = logging.getLogger("fnq.worker")

OUTAGE_BACKOFF_MAX_S = 10.0
OUTAGE_PROBE_S = 1.0  # while a queue is down, its reserves wait at most this long
GATHER_S = 0.002  # see _intake
MAX_EXTRA = 8  # see "Extra calls" above
SHORT_CALL_S = 0.01
EXTRA_PATIENCE_S = 0.2
BURIED_GRACE_S = 2.0  # at the end, the records of buried calls get this long


class Worker:
    def __init__(
        self,
        settings: Settings,
        queues: MessageQueue | Sequence[MessageQueue],
        store: Datastore,
        agent: Agent,
        *,
        prefetch: int = 2,
        worker_id: str | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        max_recording: int = MAX_RECORDING,
    ) -> None:
        self.settings = settings
        self.queues = [queues] if isinstance(queues, MessageQueue) else list(queues)
        self.agent = agent
        self.worker_id = worker_id or hostname_id()
        self.places = Places(max(1, prefetch))
        self.acks = {id(q): AckBatcher(q) for q in self.queues}
        self.running: dict[str, asyncio.Task[None]] = {}
        metrics = metrics or Metrics()
        self.calls = CallHandler(
            settings, store, agent, metrics=metrics, worker_id=self.worker_id,
            rng=rng or random.Random(), max_recording=max_recording,
        )  # fmt: skip
        metrics.recording.set_function(lambda: self.calls.recording)  # read when scraped
        # The queues whose last reserve failed: since when (loop time), and the error.
        self._down: dict[int, tuple[float, FnqError]] = {}
        self._unstarted = 0  # reserved calls not yet in a container
        self._burials: set[asyncio.Task[None]] = set()  # see _record_buried

    @property
    def completed(self) -> int:
        return self.calls.completed

    @property
    def unreached(self) -> list[FnqError]:
        """The last error of each queue that is down now (see serve's burst mode)."""
        return [error for _, error in self._down.values()]

    # ---------------------------------------------------------------- intake
    async def run(self, shutdown: Shutdown, *, burst: bool = False) -> None:
        """Take calls until ``shutdown`` (or, with ``burst``, until the queues are empty)."""
        tasks: set[asyncio.Task[None]] = set()
        heartbeat = asyncio.create_task(self.calls.heartbeat(), name="fnq-heartbeat")
        stopper: asyncio.Task[None] | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                intakes = [
                    tg.create_task(self._intake(queue, shutdown, tasks, burst), name=f"fnq-in-{i}")
                    for i, queue in enumerate(self.queues)
                ]
                stopper = asyncio.create_task(
                    self._stop_on(shutdown.stopping, intakes), name="fnq-intake-stop"
                )
        finally:
            if stopper is not None:
                stopper.cancel()
            if shutdown.stopping.is_set():  # the intakes may have ended before the stopper ran
                self._stop_waiting()
            for queue in self.queues:  # a reserve cut short by the stop may have buried some
                self._record_buried(queue)
            try:
                await self._drain(shutdown, tasks)
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                await self._end_burials()

    async def _intake(
        self, queue: MessageQueue, shutdown: Shutdown, tasks: set[asyncio.Task[None]], burst: bool
    ) -> None:
        """Reserve calls and start them while there is room. A stop request cancels
        this task wherever it waits (a reserve under way hands its messages back)."""
        poll_s = self.settings.secs("async_chew_poll_msecs")
        share = max(1, self.places.total // len(self.queues))
        wait_s = min(poll_s, 1.0) if burst else poll_s
        backlog = False
        last: set[tuple[str, str]] = set()  # app and fn of the last reserved calls
        while not shutdown.stopping.is_set():
            await self.calls.room_to_record()
            if not await self.agent.wait_async_resource(poll_s):
                continue
            # Each queue's intake takes at most its share of the places, so that an
            # empty queue waiting for messages never holds them all.
            count = await self.places.take(share, GATHER_S if backlog else 0.0)
            extra = 0  # calls beyond the places (see "Extra calls" above)
            if last:
                # Mixed functions: only their idle containers (a busy one of another
                # function would leave an extra call waiting).
                within_s = SHORT_CALL_S if len(last) == 1 else 0.0
                free = self.agent.free_containers(last, within_s=within_s)
                extra = max(0, min(MAX_EXTRA, free - self._unstarted - count))
            acks = self.acks[id(queue)]
            msgs: list[Message] = []
            # While the queue is down, the first reserve it answers ends the outage
            # (and the log says so) within OUTAGE_PROBE_S, not after a whole wait for
            # messages that may not come.
            timeout_s = min(wait_s, OUTAGE_PROBE_S) if id(queue) in self._down else wait_s
            try:
                msgs = await self._reserve(queue, acks, timeout_s, count + extra)
            finally:
                self.places.give(count - min(count, len(msgs)))
            self._record_buried(queue)
            # A reserve that got all it asked for says more are queued: the next one
            # first waits a moment for all of this queue's places to be free (they are
            # as soon as the calls holding them are dispatched), so that one round trip
            # takes several. If they are not free by then (a call waits for a
            # container), the intake does not wait again before the next reserve.
            waited_in_vain = backlog and count < share
            backlog = len(msgs) >= count and not waited_in_vain
            if not msgs and burst and not tasks:
                return
            last = {(m.call.app, m.call.fn) for m in msgs} if len(msgs) > 1 else set()
            read = RecordRead(self.calls.store, [m.call.id for m in msgs]) if msgs else None
            for i, msg in enumerate(msgs):
                handled = self._handle(Delivery(queue, msg, acks), i < count, read)
                task = asyncio.create_task(handled, name=f"fnq-call-{msg.call.id}")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if msgs:
                # Let the new calls go as far as they can (to their containers, most
                # often) before the next reserve is sent: that round trip is not theirs.
                await asyncio.sleep(0)

    def _record_buried(self, queue: MessageQueue) -> None:
        """End the records of the calls the last reserve buried, in the background:
        a slow datastore must not hold up the intake."""
        buried = queue.take_buried()
        if buried:
            task = asyncio.create_task(self.calls.record_buried(buried), name="fnq-buried")
            self._burials.add(task)
            task.add_done_callback(self._burials.discard)

    async def _end_burials(self) -> None:
        """At the end: give the records of buried calls a moment, then let them go."""
        if self._burials:
            await asyncio.wait(set(self._burials), timeout=BURIED_GRACE_S)
            for task in list(self._burials):
                task.cancel()

    async def _handle(self, d: Delivery, placed: bool, read: RecordRead | None) -> None:
        unstarted = True
        self._unstarted += 1

        def on_start() -> None:
            nonlocal unstarted
            if unstarted:
                unstarted = False
                self._unstarted -= 1
                if placed:
                    self.places.give()

        task = asyncio.current_task()
        assert task is not None
        if d.call_id in self.running:  # delivered again while it is handled here
            try:
                await self.calls.put_off_duplicate(d)
            finally:
                on_start()
            return
        self.running[d.call_id] = task
        try:
            await self.calls.handle(d, on_start, 0.0 if placed else EXTRA_PATIENCE_S, read)
        finally:
            on_start()
            self.running.pop(d.call_id, None)

    async def _reserve(
        self, queue: MessageQueue, acks: AckBatcher, timeout_s: float, count: int
    ) -> list[Message]:
        """Reserve up to ``count`` messages; the acks waiting go in the same round trip."""
        carried = acks.take()
        acked = False

        def on_acked() -> None:  # before the reserve waits for new messages
            nonlocal acked
            acked = True
            acks.carried_by_reserve(carried)

        try:
            msgs = await queue.reserve_many(
                count, timeout_s, ack=[m for m, _ in carried], on_acked=on_acked
            )
        except BaseException as exc:
            if not acked:  # they go on their own (acking twice is harmless)
                acks.give_back(carried)
            if not isinstance(exc, Exception):
                raise  # cancellation (a stop request), and the like
            if not isinstance(exc, FnqError):
                # A fault of the backend's own (a message it cannot handle, say): the
                # intake goes on as in an outage. What the reserve took comes back when
                # its reservation lapses, and the queue buries a message that keeps
                # failing after FN_MQ_MAX_DELIVERIES deliveries.
                log.exception("%s: reserving failed, pausing its intake", _name(queue))
                await self._outage(queue, QueueError(f"{type(exc).__name__}: {exc}"), told=True)
                return []
            await self._outage(queue, exc)
            return []
        if self._down and self._down.pop(id(queue), None) is not None:
            log.warning("%s is back, resuming its intake", _name(queue))
        return msgs

    async def _outage(self, queue: MessageQueue, exc: FnqError, told: bool = False) -> None:
        """One queue is down: its intake waits, longer the longer the outage lasts.
        ``told``: the caller has logged the cause."""
        now = asyncio.get_running_loop().time()
        down = self._down.get(id(queue))
        if down is None and not told:
            log.error("%s unavailable, pausing its intake: %s", _name(queue), exc)
        since = now if down is None else down[0]
        self._down[id(queue)] = (since, exc)
        delay = min(OUTAGE_BACKOFF_MAX_S, 0.2 * 2 ** min(6, int(now - since)))
        await asyncio.sleep(delay)  # a stop request cancels the intake, and this wait

    async def _stop_on(
        self, stopping: asyncio.Event, intakes: Sequence[asyncio.Task[None]]
    ) -> None:
        """At the first stop request, stop the intakes and the waiting for containers.
        No timeout: this task is cancelled once the intakes have ended."""
        await stopping.wait()
        self._stop_waiting()
        for task in intakes:
            task.cancel()

    def _stop_waiting(self) -> None:
        """The calls not yet in a container go back to the queue at once: the agent
        returns them unstarted, and their tasks hand them back (worker.calls)."""
        if self.agent.waiting_stopped:
            return
        if self._unstarted:
            log.info("%d call(s) not yet in a container go back to the queue", self._unstarted)
        self.agent.stop_waiting()

    async def _drain(self, shutdown: Shutdown, tasks: set[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        in_containers = len(tasks) - self._unstarted  # the others are going back now
        if in_containers > 0:
            log.info("waiting for %d call(s) in containers", in_containers)
        grace = asyncio.ensure_future(shutdown.wait_grace())
        pending = asyncio.ensure_future(asyncio.wait(set(tasks)))
        await asyncio.wait({grace, pending}, return_when=asyncio.FIRST_COMPLETED)
        grace.cancel()
        if tasks:
            recording = self.calls.recording  # they have run: only their records wait
            log.warning("grace period over: stopping %d call(s)%s", len(tasks),
                        f" ({recording} of them ran and wait to be recorded)" if recording
                        else "")  # fmt: skip
            for task in list(tasks):
                task.cancel()
        await pending


def _name(queue: MessageQueue) -> str:
    """How the log names a queue: the RQ bridge by its queues, else "queue"."""
    names = getattr(queue, "queue_names", None)
    return f"RQ queues {', '.join(names)}" if names else "queue"
