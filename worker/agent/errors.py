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
     +-- ContainerError           the container itself misbehaved
     |    +-- ContainerInitFailed  exited or made a bad socket before it was ready
     |    +-- ContainerInitTimeout no socket within FN_HOT_START_TIMEOUT_MSECS
     |    +-- ContainerExited      died during a call (exit code, out of memory)
     |    +-- FreezeFailed         docker pause/unpause failed
     +-- DispatchError            the HTTP exchange over the socket failed
          +-- NotDelivered         no connection to the socket: the request never left
          +-- ResponseTooBig       body or headers over the limit
          +-- InvalidResponse      status other than 200/502/504, or malformed

``failure`` on each class says how the worker should treat the call.
"""

from __future__ import annotations

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
    """The function's socket took no connection: nothing was sent, nothing ran."""


class ResponseTooBig(DispatchError):
    pass


class InvalidResponse(DispatchError):
    pass
