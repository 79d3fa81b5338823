"""A worker's side duties, on a timer: cancellations, liveness, metrics.

- Every ``CANCEL_POLL_S``: ask the datastore (one query) which of the calls
  running here were asked to stop (``fnq calls cancel``) and stop them in the
  agent; their outcome is then ``cancelled``.
- Every ``HEARTBEAT_S``: read the datastore's clock again (datastore.clock: the
  one every stored time is read from; a warning when this host's is off by
  ``SKEW_TOLD_S`` or more, and again when that changes by as much); write this
  worker's row (capacity, containers, calls)
  for ``fnq status``, and refresh the metrics gauges (with ``queues`` given,
  when the metrics are served, their depth too); and read again the
  definitions of the functions the agent has containers of, so that those of
  a function changed or deleted leave even when no call of it comes here
  (``Agent.definition_read``).

A datastore outage makes these skip a beat, logged once, never stop the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence
from importlib.metadata import version
from typing import Any

from config.domain import pid_namespace
from config.errors import FnqError, reason_of
from datastore.base import Datastore
from mq.base import MessageQueue
from worker.agent.agent import Agent
from worker.agent.stats import AgentStats
from worker.logs import current_call
from worker.metrics import Metrics

log = logging.getLogger("fnq.worker")
VERSION = version("fnq")

CANCEL_POLL_S = 0.5
MIB = 1024 * 1024
HEARTBEAT_S = 5.0
LEAVE_TIMEOUT_S = 5.0  # removing this worker's row at the end, at most
SKEW_TOLD_S = 1.0  # see the module


def describe(stats: AgentStats) -> dict[str, Any]:
    """This worker's row for ``fnq status`` (keys as docs/datastore.md lists them)."""
    res = stats.resources
    return {
        "memory_mb_used": res.memory_used_bytes // MIB,
        "memory_mb_total": res.memory_total_bytes // MIB,
        "cpu_mcpu_used": res.cpu_used_mcpus,
        "cpu_mcpu_total": res.cpu_total_mcpus,
        "containers": stats.containers,
        "calls_running": stats.calls_running,
        "calls_waiting": stats.calls_waiting,
        "version": VERSION,
        "pidns": pid_namespace(),  # whose pids this host's other workers can check
    }


class Upkeep:
    def __init__(
        self,
        worker_id: str,
        store: Datastore,
        agent: Agent,
        metrics: Metrics,
        running: Callable[[], Collection[str]],
        *,
        queues: Sequence[MessageQueue] = (),
    ) -> None:
        self.worker_id = worker_id
        self.store = store
        self.agent = agent
        self.metrics = metrics
        self.running = running
        self.queues = list(queues)
        # The duties the datastore failed last time. An outage is over when a duty
        # works and none of those that failed still fails: a full disk fails the
        # heartbeat (a write) while the cancellation poll (a read) goes on working.
        self._failing: set[str] = set()
        self._outage = False  # logged as begun, not yet as over
        self._told_skew_s = 0.0  # how far ahead the datastore's clock was last told to be

    async def run(self) -> None:
        beats = 0
        ticks_per_beat = max(1, round(HEARTBEAT_S / CANCEL_POLL_S))
        while True:
            running = list(self.running())
            if running:
                await self._guard("cancellations", self._cancellations(running))
            else:  # no call to poll for: that duty is moot until one runs
                self._failing.discard("cancellations")
            if beats % ticks_per_beat == 0:
                stats = self.agent.statistics()
                self.metrics.observe_agent(stats)
                await self._observe_queues()
                await self._guard("clock", self._read_clock())
                beat = self.store.worker_heartbeat(self.worker_id, describe(stats))
                await self._guard("heartbeat", beat)
                await self._guard("definitions", self._definitions())
            beats += 1
            await asyncio.sleep(CANCEL_POLL_S)

    async def _read_clock(self) -> None:
        await self.store.read_clock()
        clock = self.store.clock
        if not clock.read:  # the host's own (SQLite)
            return
        ahead_s = clock.ahead_of_host().total_seconds()
        if abs(ahead_s - self._told_skew_s) < SKEW_TOLD_S:
            return
        self._told_skew_s = ahead_s
        if abs(ahead_s) < SKEW_TOLD_S:
            log.info("this host's clock agrees with the datastore's again")
            return
        log.warning("this host's clock is %.1f s %s the datastore's; the times stored and "
                    "compared are the datastore's", abs(ahead_s),
                    "behind" if ahead_s > 0 else "ahead of")  # fmt: skip

    async def _observe_queues(self) -> None:
        """``fnq_queue_messages``: a queue that cannot be read now keeps its last depth."""
        if not self.queues:
            return
        try:
            async with asyncio.timeout(HEARTBEAT_S):
                stats = [await queue.stats() for queue in self.queues]
        except (FnqError, TimeoutError) as exc:
            log.debug("queue depth not read for the metrics: %s", exc)
            return
        self.metrics.observe_queues(stats)

    async def _definitions(self) -> None:
        held = sorted(self.agent.functions())
        if not held:
            return
        found = await self.store.get_fns(held)  # one read, however many functions
        for app, name in held:
            self.agent.definition_read(app, name, found.get((app, name)))

    async def _cancellations(self, ids: list[str]) -> None:
        for call_id in await self.store.cancel_requested(ids):
            if await self.agent.cancel(call_id):
                token = current_call.set(call_id)  # the line is tagged with the call
                try:
                    log.info("call %s cancelled on request", call_id)
                finally:
                    current_call.reset(token)

    async def _guard(self, duty: str, step: Any) -> None:
        """Run one duty's ``step``. The first failure of an outage is logged, and its
        end once a step works and every duty that failed (and still applies) has
        worked again: only a step that reached the datastore tells it is back."""
        try:
            await asyncio.wait_for(step, timeout=HEARTBEAT_S)
        except (FnqError, TimeoutError) as exc:
            if not self._outage:
                log.warning("datastore unavailable for cancellations/heartbeats: %s",
                            reason_of(exc, HEARTBEAT_S))  # fmt: skip
                self._outage = True
            self._failing.add(duty)
            return
        self._failing.discard(duty)
        if self._outage and not self._failing:
            log.warning("datastore is back: cancellations and heartbeats resume")
            self._outage = False

    async def leave(self) -> None:
        try:
            await asyncio.wait_for(self.store.worker_gone(self.worker_id), LEAVE_TIMEOUT_S)
        except (FnqError, TimeoutError) as exc:
            log.warning(
                "could not remove this worker's row (it expires by itself): %s",
                reason_of(exc, LEAVE_TIMEOUT_S),
            )
