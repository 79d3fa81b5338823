"""What a running worker is doing, on demand: ``kill -USR1 PID``.

The worker logs one warning that lists every asyncio task with the chain of
awaits it is suspended in (file, line and function of each step, down to the
future it waits for), then the stack of every other thread (the datastore's
writer, the queue's SQLite thread, executor threads). It keeps running.

This is for a worker that seems stuck: the list shows which wait each task is
in. A worker whose event loop itself is blocked cannot answer the signal; for
that, ``PYTHONFAULTHANDLER=1`` in its environment and ``kill -ABRT PID`` make
Python print every thread's stack to stderr as the process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("fnq.worker")

MAX_DEPTH = 40  # steps of one task's await chain
THREAD_FRAMES = 12  # innermost frames shown per thread


def _where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_qualname}"


def await_chain(coro: Any, waits_for: object = None) -> list[str]:
    """Where ``coro`` is suspended: one line per coroutine (or generator) it awaits
    through, outermost first, then what the innermost one waits for (``waits_for``,
    the task's future, when given: a C future's awaitable does not name it)."""
    steps: list[str] = []
    obj = coro
    for _ in range(MAX_DEPTH):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        frame = frame or getattr(obj, "ag_frame", None)
        if frame is None:
            if obj is not None and obj is not coro:
                shown = waits_for if waits_for is not None else obj
                steps.append(f"waits for {shown!r:.160}")
            break
        steps.append(_where(frame))
        inner = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        obj = inner or getattr(obj, "ag_await", None)
        if obj is None:
            break
    return steps


def describe_tasks() -> str:
    """Every task of the running loop and where it waits."""
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"{len(tasks)} task(s):"]
    for task in tasks:
        lines.append(f"  task {task.get_name()}")
        waits_for = getattr(task, "_fut_waiter", None)  # CPython's, C and Python tasks
        lines.extend(f"    {step}" for step in await_chain(task.get_coro(), waits_for))
    return "\n".join(lines)


def describe_threads() -> str:
    """The innermost frames of every thread but the caller's."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    others = {i: f for i, f in sys._current_frames().items() if i != me}
    lines = [f"{len(others)} other thread(s):"]
    for ident, frame in others.items():
        lines.append(f"  thread {names.get(ident, ident)}")
        stack = traceback.extract_stack(frame)[-THREAD_FRAMES:]
        lines.extend(f"    {s.filename}:{s.lineno} in {s.name}" for s in stack)
    return "\n".join(lines)


def log_state() -> None:
    try:
        text = f"{describe_tasks()}\n{describe_threads()}"
    except Exception:  # a dump must never take the worker down
        log.exception("describing the worker's state failed")
        return
    log.warning("state on request (SIGUSR1): %s", text)


@contextlib.contextmanager
def state_on_signal(sig: int = signal.SIGUSR1) -> Iterator[None]:
    """Log the worker's state (:func:`log_state`) at each ``sig`` while inside."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(sig)
    loop.add_signal_handler(sig, log_state)
    try:
        yield
    finally:
        loop.remove_signal_handler(sig)
        signal.signal(sig, previous)
