"""Two-phase shutdown.

Phase one (first SIGTERM/SIGINT, or :meth:`Shutdown.request`): stop taking
work; calls already running in containers may finish within the grace
period; calls reserved but not yet in a container (waiting for one: every
container of their function busy, no room to start another, or one being
started) are handed back to the queue at once, their records put back to
`queued` first (``Agent.stop_waiting``, worker.loop, worker.calls). Phase two
(a second signal, or the grace period running out): running calls are
cancelled, their containers retired, their records put back to `queued` and
then their messages handed back (worker.calls, worker.running).

Signal handlers are installed only by :func:`signal_handlers`, so embedding
fnq (and its tests) never has process signals seized; the previous handlers
are restored on exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("fnq.worker")


class Shutdown:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.stopping = asyncio.Event()
        self.aborting = asyncio.Event()

    def request(self, reason: str = "requested") -> None:
        if self.stopping.is_set():
            if not self.aborting.is_set():
                log.warning("second stop request (%s): stopping running calls now", reason)
            self.aborting.set()
            return
        log.info("stopping (%s): no new calls; running calls get %.0f s", reason, self.grace_s)
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()
        self.aborting.set()

    async def wait_grace(self) -> None:
        """Return when the grace period is over or a second request came."""
        try:
            await asyncio.wait_for(self.aborting.wait(), timeout=self.grace_s)
        except TimeoutError:
            self.aborting.set()


@contextmanager
def signal_handlers(shutdown: Shutdown) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, shutdown.request, sig.name)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])
