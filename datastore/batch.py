"""Group commit: many concurrent writers, one transaction per round.

Callers ``submit`` an operation and await its result. One background task
takes everything that has piled up (up to ``max_batch``), hands the list to
the backend's ``run_batch`` (which runs it in a single transaction) and
resolves each caller's future once that transaction has committed. While one
round runs, the next one fills up, so the batch size follows the load with no
timer. A backend may also bound a round's bytes (``size``, ``max_bytes``): a
round of large responses and logs then holds fewer of them, so that it is
sent and committed within the backend's statement timeout.

When ``run_batch`` fails with an error the backend calls an outage (database
down, connection lost, file locked past its timeout, disk full), the same
batch is tried again with exponential backoff; callers simply wait (a worker
keeps the outcomes it ran). The outage is logged once when it starts and once
when it ends. A disk with room for part of a batch (``splits_on``: the
backend's "disk full") gets it in halves, each halved again while it does
not fit, down to single writes that wait for room: after a long outage a
batch holds up to ``max_batch`` calls' bodies and logs, more than the room
freed may take at once. With ``give_up_after_s`` set (a command of the CLI, which has
no call to keep and a user waiting), a batch that has failed so long is
dropped instead, each of its writers told with StoreUnavailable.

A caller cancelled while waiting does not withdraw its operation: it may
still be written. ``close`` stops new submissions and waits, up to a bound,
for what is pending; whatever is left then fails with StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from datastore.errors import StoreClosed, StoreUnavailable

log = logging.getLogger("fnq.datastore.batch")

OpT = TypeVar("OpT")

MAX_BATCH = 512
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 5.0


@dataclass(frozen=True, slots=True)
class Failed:
    """The result of one operation that raised (the others in its batch still count)."""

    error: BaseException


class GroupCommit(Generic[OpT]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[OpT]], Awaitable[list[Any]]],
        is_outage: Callable[[BaseException], bool],
        *,
        splits_on: Callable[[BaseException], bool] | None = None,
        max_batch: int = MAX_BATCH,
        size: Callable[[OpT], int] | None = None,
        max_bytes: int = 0,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._is_outage = is_outage
        self._splits_on = splits_on  # an outage a smaller batch may get through
        self._max_batch = max_batch
        self._size = size
        self._max_bytes = max_bytes
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._pending: deque[tuple[OpT, asyncio.Future[Any]]] = deque()
        self._inflight: list[asyncio.Future[Any]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._outage_since: float | None = None
        # None: a batch waits out any outage; else it is given up after this long
        self.give_up_after_s: float | None = None
        self.batches = 0  # rounds committed, for tests and benchmarks
        self.ops = 0  # operations committed

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-group-commit")

    async def submit(self, op: OpT) -> Any:
        """Queue ``op`` for the next round; return its result once committed."""
        if self._closing or self._task is None:
            raise StoreClosed()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake.set()
        result = await future
        if isinstance(result, Failed):
            raise result.error
        return result

    async def close(self, timeout_s: float) -> None:
        """Flush what is pending within ``timeout_s``, then stop the writer."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.error(  # noqa: TRY400 - a timeout, not an exception worth a traceback
                "%s: closed with writes still pending after %.1f s", self.name, timeout_s
            )
        finally:
            self._fail_all(StoreUnavailable("the datastore closed before this write was stored"))

    # ------------------------------------------------------------ the writer

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                count = self._take()
                batch = [self._pending.popleft() for _ in range(count)]
                self._inflight = [future for _, future in batch]
                results = await self._commit([op for op, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
                self._inflight = []
                self.batches += 1
                self.ops += count
        finally:
            self._fail_all(StoreUnavailable("the datastore writer stopped"))

    def _take(self) -> int:
        """How many pending operations the next round takes: at most ``max_batch``
        and, with ``size``, at most ``max_bytes`` of them (but always one)."""
        count = min(len(self._pending), self._max_batch)
        if self._size is None:
            return count
        total = 0
        for taken, (op, _) in enumerate(itertools.islice(self._pending, count)):
            total += self._size(op)
            if taken and total > self._max_bytes:
                return taken
        return count

    async def _commit(self, ops: list[OpT]) -> list[Any]:
        results, answered = await self._commit_part(ops)
        if answered and self._outage_since is not None:
            log.warning("%s: the database is back after %.1f s",
                        self.name, time.monotonic() - self._outage_since)  # fmt: skip
            self._outage_since = None
        return results

    async def _commit_part(self, ops: list[OpT]) -> tuple[list[Any], bool]:
        """The results of ``ops``, committed in one transaction, or in two halves
        (each split again if need be) when the backend says the batch is too big for
        the room it has (``splits_on``: a disk with room for part of it); and whether
        the database answered (False: the write was given up, ``give_up_after_s``)."""
        delay_s = self._backoff_initial_s
        first_failure: float | None = None
        while True:
            try:
                return await self._run_batch(ops), True
            except Exception as exc:  # noqa: BLE001 - classified below; a batch never kills the writer
                if not self._is_outage(exc):
                    return [Failed(exc)] * len(ops), True
                now = time.monotonic()
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning("%s: the database is unavailable (%s); writes wait and retry",
                                self.name, reason)  # fmt: skip
                if len(ops) > 1 and self._splits_on is not None and self._splits_on(exc):
                    half = len(ops) // 2
                    first, answered = await self._commit_part(ops[:half])
                    if not answered:  # given up: so is the rest
                        return first + [first[-1]] * (len(ops) - half), False
                    rest, answered = await self._commit_part(ops[half:])
                    return first + rest, answered
                if first_failure is None:
                    first_failure = now
                pause_s = delay_s
                if self.give_up_after_s is not None:
                    pause_s = min(pause_s, self.give_up_after_s - (now - first_failure))
                    if pause_s <= 0:
                        error = StoreUnavailable(
                            f"the datastore could not be written for {now - first_failure:.1f}"
                            f" s ({reason}); the write was given up"
                        )
                        return [Failed(error)] * len(ops), False
                await asyncio.sleep(pause_s)
                delay_s = min(delay_s * 2, self._backoff_max_s)

    def _fail_all(self, error: StoreUnavailable) -> None:
        futures = self._inflight + [future for _, future in self._pending]
        self._pending.clear()
        self._inflight = []
        for future in futures:
            if not future.done():
                future.set_exception(error)
