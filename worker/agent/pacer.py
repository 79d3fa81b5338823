"""Turns for pausing containers, so that many idle ones do not pause all at once.

A pause is background work of the engine (about 13 ms here: the engine, the
container runtime and a short-lived runtime process per container). After a
burst, every container of a function goes idle within a few milliseconds, and
their freeze timers end together: in one trace, 5 pauses at the same moment
took 37-49 ms each on both cores of a small host, and calls arriving
meanwhile waited up to 55 ms. The pacer hands out pause times at least ``spacing_s`` apart; a
container whose freeze timer has run out sleeps until its turn (a call may
still take it meanwhile, and then its turn is simply not used).

Unpausing is never paced: a call is waiting for it.
"""

from __future__ import annotations

PAUSE_SPACING_S = 0.05


class FreezePacer:
    def __init__(self, spacing_s: float = PAUSE_SPACING_S) -> None:
        self.spacing_s = spacing_s
        self._next = float("-inf")  # loop time of the next free turn

    def book(self, now: float) -> float:
        """The loop time, ``now`` or later, at which the caller may pause a container."""
        at = max(now, self._next)
        self._next = at + self.spacing_s
        return at
