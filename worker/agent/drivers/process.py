"""A watch on a container's first process, through a pidfd: its exit as it happens.

The engine reports a container's exit some tens of milliseconds after its
process is gone (the runtime tells containerd, which tells dockerd); a pidfd
becomes readable at once. The docker driver uses it to let go of the output
pipes it holds (drivers.stdio), and to tell, right after a broken exchange, a
function that is dying from one that lives on.

The pid comes from the engine (``State.Pid``), in the engine's pid namespace.
A watch is made only when that pid names the container's process for the
worker too: the process's cgroup names the container. Otherwise (a worker in
a pid namespace of its own, a kernel without pidfds, before Linux 5.3) there
is none, and the driver goes by the engine's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger("fnq.agent.docker")


class ProcessWatch:
    """``gone`` is done once the process has exited; ``on_exit`` is called then."""

    def __init__(self, pidfd: int, on_exit: Callable[[], None]) -> None:
        self._pidfd: int | None = pidfd
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._exited)

    @classmethod
    def open(cls, pid: int, container_id: str, on_exit: Callable[[], None]) -> ProcessWatch | None:
        """The watch of process ``pid`` if it is the container's (``container_id``: the
        engine's full id), else None."""
        try:
            pidfd = os.pidfd_open(pid)
        except (OSError, AttributeError) as exc:
            log.debug("no pidfd for %s (%s): its exit is seen a little later", container_id, exc)
            return None
        # Opened first: a pid reused since the engine named it fails this check.
        if not container_id or container_id not in _cgroups(pid):
            log.debug("pid %d is not the process of %s here: not watched", pid, container_id)
            os.close(pidfd)
            return None
        try:
            return cls(pidfd, on_exit)
        except OSError as exc:  # the loop cannot watch it
            log.debug("cannot watch the process of %s: %s", container_id, exc)
            os.close(pidfd)
            return None

    def _exited(self) -> None:
        self.close()
        if not self.gone.done():
            self.gone.set_result(None)
        self._on_exit()

    def close(self) -> None:
        """Stop watching (``gone`` stays as it is)."""
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            with contextlib.suppress(OSError):
                os.close(pidfd)


def _cgroups(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""
