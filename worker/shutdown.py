"""Two-phase shutdown.

Phase one (first SIGTERM/SIGINT, or :meth:`Shutdown.request`): stop taking
work; calls already running in containers may finish within the grace
period, counted from the request (not from the moment the intake has
stopped: a reserve under way when the request came, say to a queue that went
silent, may take up to its time limit to end); calls reserved but not yet in
a container (waiting for one: every container of their function busy, no
room to start another, or one being started) are handed back to the queue at
once, their records put back to `queued` first (``Agent.stop_waiting``,
worker.loop, worker.calls). Phase two
(a second signal, or the grace period running out): running calls are
cancelled, their containers retired, their records put back to `queued` (the
run counted among their attempts: the function ran) and then their messages
handed back (worker.calls, worker.running).

A signal that comes again within ``SIGNAL_REPEAT_S`` of the first is taken as
the same request delivered twice, not as the second: ``timeout``, a terminal's
Ctrl-C under a process manager, and other tools signal a whole process group,
so the worker and its parent (which passes the signal on) both get it, and a
worker would otherwise stop its running calls at once where one stop was
meant. A second signal is one that comes later.

Signal handlers are installed only by :func:`signal_handlers`, so embedding
fnq (and its tests) never has process signals seized; the previous handlers
are restored on exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("fnq.worker")

SIGNAL_REPEAT_S = 1.0  # a stop signal again within this long of the first is the same request


class Shutdown:
    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()
        self._clock = clock
        self._first_signal_at: float | None = None
        self._requested_at: float | None = None  # time.monotonic() of the first request

    def signalled(self, name: str) -> None:
        """A stop signal came: :meth:`request`, unless it repeats the first one within
        ``SIGNAL_REPEAT_S`` (see the module)."""
        now = self._clock()
        first = self._first_signal_at
        if first is None:
            self._first_signal_at = now
        elif now - first < SIGNAL_REPEAT_S:
            log.info("%s again within %g s of the first: the same stop request", name,
                     SIGNAL_REPEAT_S)  # fmt: skip
            return
        self.request(name)

    def request(self, reason: str = "requested") -> None:
        if self.stopping.is_set():
            if not self.aborting.is_set():
                log.warning("second stop request (%s): stopping running calls now", reason)
            self.aborting.set()
            return
        log.info("stopping (%s): no new calls; running calls get %.0f s", reason, self.grace_s)
        self._requested_at = time.monotonic()
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()
        self.aborting.set()

    async def wait_grace(self) -> None:
        """Return when the grace period (from the first request) is over or a second
        request came."""
        left_s = self.grace_s
        if self._requested_at is not None:
            left_s -= time.monotonic() - self._requested_at
        try:
            await asyncio.wait_for(self.aborting.wait(), timeout=max(0.0, left_s))
        except TimeoutError:
            self.aborting.set()


@contextmanager
def signal_handlers(shutdown: Shutdown) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, shutdown.signalled, sig.name)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])
