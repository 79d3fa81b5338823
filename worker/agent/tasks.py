"""Task helpers of the agent: a tracked set of background tasks, and an await
that other futures can interrupt.

A hot container lives longer than the call that launched it, so it cannot be
a child of that call's TaskGroup; the agent owns it in a :class:`TaskSet`
instead, and :meth:`TaskSet.close` cancels and awaits whatever is left. A task
that dies of an unexpected error is logged at once, not when someone finally
looks.

:func:`interruptible` awaits something in the current task (no task of its
own) until it is done, a timeout passes, or one of some futures completes
first: a call's dispatch against its container's exit and a stop request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("fnq.agent")
T = TypeVar("T")


class Interrupted(Exception):
    """One of the interrupting futures completed before the await was done."""


async def interruptible(
    awaitable: Awaitable[T],
    timeout_s: float,
    *interrupters: asyncio.Future[Any],
    loop: asyncio.AbstractEventLoop | None = None,
) -> T:
    """Await ``awaitable`` in this task: its result, TimeoutError after ``timeout_s``,
    or :class:`Interrupted` as soon as one of ``interrupters`` completes.

    An interrupter cancels this task, and that cancellation is told apart from
    one that comes from outside, which goes on up as it is (asyncio.timeout
    does the same for its own). Once this returns or raises, no interrupter
    can reach the task any more. ``loop``: the running loop, if the caller has it.
    """
    loop = loop or asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    armed, interrupted, timed_out = True, False, False

    def interrupt(_: asyncio.Future[Any]) -> None:
        nonlocal interrupted
        if armed and not interrupted and not timed_out:
            interrupted = True
            task.cancel()

    def expire() -> None:
        nonlocal timed_out
        if armed and not interrupted and not timed_out:
            timed_out = True
            task.cancel()

    for future in interrupters:
        future.add_done_callback(interrupt)
    # One timer rather than a timeout scope: this wraps every call's dispatch.
    timer = loop.call_later(timeout_s, expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        armed = False
        if (interrupted or timed_out) and task.uncancel() == 0:
            if timed_out:
                raise TimeoutError() from None
            raise Interrupted() from None
        raise
    finally:
        armed = False
        timer.cancel()
        for future in interrupters:
            future.remove_done_callback(interrupt)


class TaskSet:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # A fresh context: these tasks outlive the call that happened to start them,
        # so they must not carry that call's context variables (e.g. its id in logs).
        task = asyncio.create_task(coro, name=name, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s task %s crashed", self.name, task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def join(self, timeout_s: float) -> bool:
        """Wait for every task to end by itself; False if some are still running."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every task and wait (bounded) until they are gone."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.error("%s task %s ignored cancellation", self.name, task.get_name())
