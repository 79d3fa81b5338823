"""Errors of the agent core and its drivers, each tied to how a call ends.

::

    AgentError
     +-- CallNotStarted            the call never reached a container
     |    +-- ServerBusy           no room in time (retry later, no attempt charged)
     |    +-- ResourceTooBig       can never fit on this machine (terminal)
     |    +-- InvalidCall          a header cannot be sent to the function (terminal)
     |    +-- ImageNotFound        image missing and cannot be pulled (terminal)
     |    +-- ImageHasVolume       image declares VOLUME (terminal)
     |    +-- ImagePullTimeout     pull ran past FN_HOT_PULL_TIMEOUT_MSECS
     |    +-- AgentClosed          the agent is shutting down (retry elsewhere)
     |    +-- HostShort            the host ran out of descriptors, disk or memory (retry later)
     +-- ContainerError           the container itself misbehaved
     |    +-- ContainerInitFailed  exited or made a bad socket before it was ready
     |    +-- ContainerInitTimeout no socket within FN_HOT_START_TIMEOUT_MSECS
     |    +-- ContainerExited      died during a call (exit code, out of memory)
     |    +-- FreezeFailed         docker pause/unpause failed
     +-- DispatchError            the HTTP exchange over the socket failed
          +-- NotDelivered         no connection to the socket: the request never left
          |    |                   (and whether the container's process is gone)
          |    +-- NotAccepted     the function took no connection within the call's
          |                        timeout: the call never reached it, but the
          |                        function failed it (counted, retried)
          +-- ExchangeBroken       the connection broke mid-call (and whether the
          |                        container's process then exited)
          +-- ResponseTooBig       body or headers over the limit
          +-- InvalidResponse      status other than 200/502/504, or malformed

``failure`` on each class says how the worker should treat the call.
"""

from __future__ import annotations

import errno

from config.domain import FailureKind
from config.errors import AgentError, Retryable


class CallNotStarted(AgentError):
    failure = FailureKind.BUSY


class ServerBusy(CallNotStarted, Retryable):
    failure = FailureKind.BUSY

    def __init__(self, message: str = "timed out waiting for a container: server too busy"):
        super().__init__(message)


class AgentClosed(CallNotStarted, Retryable):
    failure = FailureKind.BUSY

    def __init__(self, message: str = "the agent is shutting down"):
        super().__init__(message)


# What an OSError says when the worker's host ran out of something: descriptors (the
# process's or the system's), disk space or inodes, a disk quota, kernel memory or
# buffers. Not the function's doing: a container of it would start once there is room.
SHORTAGE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.ENOBUFS}
)


class HostShort(CallNotStarted, Retryable):
    """The worker's host ran out of something the worker needs to start or reach a
    container (see SHORTAGE_ERRNOS). The call goes back to the queue, no attempt
    counted, as for a call that found no room."""

    failure = FailureKind.BUSY


def shortage(exc: BaseException) -> OSError | None:
    """The OSError saying the host ran out of something that ``exc`` is, or was
    raised from (a client library's error wrapping it); None if there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in SHORTAGE_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def host_short(exc: BaseException, doing: str) -> HostShort | None:
    """``exc`` as a HostShort when it comes of a shortage on the host, with what the
    worker was ``doing`` ("making a container's socket directory"); else None."""
    cause = shortage(exc)
    if cause is None:
        return None
    what = cause.strerror or str(cause)
    where = f" ({cause.filename})" if cause.filename else ""
    return HostShort(f"the worker's host ran out of resources while {doing}: {what}{where}")


class ResourceTooBig(CallNotStarted):
    failure = FailureKind.TERMINAL


class InvalidCall(CallNotStarted):
    failure = FailureKind.TERMINAL


class ImageNotFound(CallNotStarted):
    failure = FailureKind.TERMINAL


class ImageHasVolume(CallNotStarted):
    failure = FailureKind.TERMINAL


class ImagePullTimeout(CallNotStarted, Retryable):
    failure = FailureKind.BUSY


class ContainerError(AgentError):
    failure = FailureKind.FUNCTION


class ContainerInitFailed(ContainerError):
    pass


class ContainerInitTimeout(ContainerError):
    pass


class ContainerExited(ContainerError):
    def __init__(self, message: str, exit_code: int | None = None, oom_killed: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.oom_killed = oom_killed


class FreezeFailed(ContainerError):
    pass


class DispatchError(AgentError):
    """The socket exchange failed; the container's state is unknown, retire it."""

    failure = FailureKind.FUNCTION


class NotDelivered(DispatchError):
    """The function's socket took no connection: nothing was sent, nothing ran.
    ``exited``: the driver watched the container's process when the connection was
    refused, and it was gone (True) or lived on (False); None when the driver does
    not tell."""

    def __init__(self, message: str, exited: bool | None = None):
        super().__init__(message)
        self.exited = exited


class NotAccepted(NotDelivered):
    """The function did not take the call's connection within the call's timeout: its
    listener's backlog stayed full, or the connection waited in that backlog and the
    function never accepted it. The call never reached the function, but its
    container failed it, as one that never starts does: the function's failure,
    counted and retried while attempts remain; the container is retired (it is
    stuck)."""


class ExchangeBroken(DispatchError):
    """The connection broke before the answer was complete. ``exited``: the driver
    watched the container's process after the break, and it exited (True) or lived
    on (False); None when the driver does not tell."""

    def __init__(self, message: str, exited: bool | None = None):
        super().__init__(message)
        self.exited = exited


class ResponseTooBig(DispatchError):
    pass


class InvalidResponse(DispatchError):
    pass
