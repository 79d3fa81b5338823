"""The datastore's clock: the one clock every stored time is read from.

Workers on many hosts share one datastore, and their wall clocks may be seconds
or minutes apart, or step while they run. So every time fnq stores, and every
time it compares with a stored one (a call's start and end, a worker's
heartbeat, a definition's change, the cutoff of a purge or of a listing, a
call's age), is read from the datastore's clock, whatever host reads it:

- PostgreSQL: the server's clock (``clock_timestamp()``), read when the store
  is opened and again at each ``read_clock`` (every worker heartbeat), and
  carried on from the last reading by this process's monotonic clock, so that a
  step of this host's wall clock changes nothing. A reading is within half its
  round trip of the server's time; a host clock that is within that too counts
  as the server's.
- SQLite: this host's wall clock (the file is shared by processes of one host).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from config.domain import utcnow

# Beside half the round trip of a reading, how far the host's clock may be off the
# server's and still count as agreeing with it (set).
AGREE_SLACK_S = 0.001


class StoreClock:
    """The datastore's time as this process tells it: the host's wall clock until
    the datastore's own clock has been read (``set``), then that one."""

    def __init__(self) -> None:
        self._reading: tuple[datetime, float] | None = None  # its time, and monotonic then

    def now(self) -> datetime:
        if self._reading is None:
            return utcnow()
        read_at, then_s = self._reading
        return read_at + timedelta(seconds=time.monotonic() - then_s)

    def at(self, monotonic_s: float) -> datetime:
        """The clock's time at the instant when this process's ``time.monotonic()``
        was ``monotonic_s``."""
        if self._reading is None:
            return utcnow() - timedelta(seconds=time.monotonic() - monotonic_s)
        read_at, then_s = self._reading
        return read_at + timedelta(seconds=monotonic_s - then_s)

    def set(self, read_at: datetime, sent_s: float, answered_s: float) -> None:
        """The datastore said its time was ``read_at`` in answer to a query sent at
        ``sent_s`` and answered at ``answered_s`` (``time.monotonic()``).

        The server read its clock somewhere within that round trip. A host whose
        own clock lies within the round trip too (the server's host itself, or one
        kept in step with it) is not told apart from the server: its own reading is
        taken, so that the times it stores and the ones it reads from its clock
        agree to the microsecond rather than to half a round trip."""
        host_read_s = time.monotonic()
        host_at = utcnow()
        mid_s = (sent_s + answered_s) / 2
        host_at_mid = host_at - timedelta(seconds=host_read_s - mid_s)
        half_trip = timedelta(seconds=(answered_s - sent_s) / 2 + AGREE_SLACK_S)
        if abs(read_at - host_at_mid) <= half_trip:
            read_at = host_at_mid
        self._reading = (read_at, mid_s)

    @property
    def read(self) -> bool:
        """Whether the datastore's own clock was read (else: the host's wall clock)."""
        return self._reading is not None

    def ahead_of_host(self) -> timedelta:
        """How far the datastore's clock is ahead of this host's wall clock (negative:
        behind)."""
        return self.now() - utcnow()
