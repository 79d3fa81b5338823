"""A spell of the host running short of what containers need, logged once.

When the worker's host runs out of file descriptors, disk space or inodes
under the socket directories, or kernel memory, container starts (and new
connections to functions' sockets) fail, over and over, each failure handing
its call back to the queue (worker.agent.errors, HostShort). At the edge of
a limit some of them succeed in between, as descriptors come and go. The log
says so when the spell begins, with the first reason; then at most once a
minute while it lasts, with how many failed; and once when it is over: at
a start or connection that worked, once ``QUIET_S`` have passed without a
failure.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time

from worker.agent.errors import HostShort

QUIET_S = 5.0  # a spell is over once something works this long after its last failure
REMIND_S = 60.0  # while it lasts, a line at most this often
# Descriptors a container takes in the worker while it starts: what it holds once up
# (HELD_DESCRIPTORS), and a few more for its start (inotify, requests to the engine).
CONTAINER_DESCRIPTORS = 16
# Descriptors an idle container holds in the worker, and gives back as it is removed
# (measured, tests/docker/test_host_short.py): both ends of its two output pipes, its
# cgroup's three counters, the attach stream, the wait for its exit, the connection to
# its socket and the pidfd of its process. One whose output comes through the engine
# holds two fewer.
HELD_DESCRIPTORS = 11
# Descriptors a new connection to a function's socket takes: the socket, and for the
# connect the listener's O_PATH descriptor (worker.agent.iofs.open_listener).
CONNECTION_DESCRIPTORS = 2
# Descriptors a launch looks for beside those of the containers starting (each counted
# with CONTAINER_DESCRIPTORS until it is up): its start's, and a connection's more.
# Between the launch's look and its start's own check, a container that has just come
# up opens its first call's connection (it is up holding one descriptor fewer than
# HELD_DESCRIPTORS), and a call whose kept-alive connection lapsed opens a new one.
LAUNCH_DESCRIPTORS = CONTAINER_DESCRIPTORS + CONNECTION_DESCRIPTORS
_FD_DIR = "/proc/self/fd"
_STATUS = "/proc/self/status"


def descriptors_left(needed: int = 0) -> int | None:
    """File descriptors the worker's process may still open below its limit (``ulimit
    -n``), or at least ``needed`` of them when it has that many; None where the limit
    is unbounded or the open ones cannot be listed (no /proc).

    Listing the open descriptors takes about 0.4 ms per thousand, on the event loop;
    the size of the process's descriptor table (which no open descriptor is past) is
    read at a cost that does not grow with them, and when it leaves ``needed`` below
    the limit, no list is made."""
    limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if limit == resource.RLIM_INFINITY:
        return None
    if needed > 0:
        table = _table_size()
        if table is not None and limit - table >= needed:
            return limit - table
    try:
        used = len(os.listdir(_FD_DIR))
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return None
        used = limit  # not even one left to list them with
    return max(0, limit - used)


def _table_size() -> int | None:
    """The size of this process's descriptor table (FDSize in /proc/self/status);
    None if it cannot be read."""
    try:
        with open(_STATUS, "rb") as status:
            for line in status:
                if line.startswith(b"FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def containers_in_the_way(needed: int = CONTAINER_DESCRIPTORS) -> int:
    """How many idle containers must leave for the worker to have ``needed`` file
    descriptors left, each giving back HELD_DESCRIPTORS; 0 when it has them.

    The count is of the moment, and a descriptor or two off either way a moment
    later: requests to the engine made alongside each other (a sweep for leftovers,
    a removal's, a start's) each take a connection, which the session then keeps
    idle until unused for 15 s, and a start's readiness watch is closed in a thread
    just after the start. So an eviction may give back one fewer than counted, or a
    container too many may go. Neither is worth a margin: a launch counts again once
    the containers it evicted are gone (and evicts more if need be), and one
    container gives back far more than a connection's two."""
    left = descriptors_left(needed)
    if left is None or left >= needed:
        return 0
    return -(-(needed - left) // HELD_DESCRIPTORS)


def check_descriptors(needed: int = CONTAINER_DESCRIPTORS) -> None:
    """HostShort when the worker's process has fewer than ``needed`` file descriptors
    left below its limit (``ulimit -n``): a container it started would fail half-way,
    after the engine had made it. Nothing is checked where the limit is unbounded or
    the open descriptors cannot be listed (no /proc)."""
    left = descriptors_left(needed)
    if left is not None and left < needed:
        limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        raise HostShort(
            f"the worker's host ran out of resources while creating a container: "
            f"{limit - left} of the worker's {limit} file descriptors are in use (ulimit -n), "
            f"and a container takes about {needed}"
        )


class ShortageLog:
    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._since: float | None = None  # when the spell began
        self._last_failure = 0.0
        self._last_work = 0.0
        self._reminded = 0.0
        self._settle: asyncio.TimerHandle | None = None  # the look for the spell's end
        self.failures = 0  # starts and connections that failed for it, in this spell
        self._reported = 0  # of them, those the log has counted

    @property
    def short(self) -> bool:
        return self._since is not None

    def failed(self, exc: HostShort) -> None:
        """A start or a connection failed for want of something on the host."""
        now = time.monotonic()
        self.failures += 1
        self._last_failure = now
        if self._since is None:
            self._since = self._reminded = now
            self._reported = self.failures
            self._log.warning("%s; calls that need a new container or connection go back to "
                              "the queue until the host has room again", exc)  # fmt: skip
        elif now - self._reminded >= REMIND_S:
            self._log.warning("the host is still short of resources for containers: %d more "
                              "start(s) or connection(s) failed in %.0f s; the last: %s",
                              self.failures - self._reported, now - self._reminded,
                              exc)  # fmt: skip
            self._reminded = now
            self._reported = self.failures

    def worked(self) -> None:
        """A container started, or a connection was made: the spell is over if nothing
        fails for QUIET_S after its last failure (looked at again then, if need be)."""
        if self._since is None:
            return
        self._last_work = time.monotonic()
        if self._settle is None:
            self._look()

    def _look(self) -> None:
        self._settle = None
        if self._since is None or self._last_work < self._last_failure:
            return  # over already, or it failed again since it last worked
        quiet_s = time.monotonic() - self._last_failure
        if quiet_s < QUIET_S:
            self._settle = asyncio.get_running_loop().call_later(QUIET_S - quiet_s, self._look)
            return
        self._log.warning("the host has room for containers again after %.1f s (%d start(s) "
                          "or connection(s) failed meanwhile)",
                          self._last_work - self._since, self.failures)  # fmt: skip
        self._since = None
        self.failures = self._reported = 0

    def close(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
