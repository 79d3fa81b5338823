"""How one call ends in a container, and how that becomes an :class:`Outcome`.

=====================================  ===========  =========  =================
what happened                          status       failure    container
=====================================  ===========  =========  =================
FDK answered 200                       success      -          kept
FDK answered 200, body over the limit  error        terminal   kept
FDK answered 502                       error        function   kept
FDK answered 504                       timeout      function   kept
other status, malformed, dropped       error        function   retired
ran past the function's timeout        timeout      function   killed
container died mid-call                error        function   replaced
cancelled on request                   cancelled    cancelled  retired
stopped by shutdown after the grace    error        busy       retired
never started: busy, closed, pull      error        busy       -
not accepted within its timeout        error        function   retired
never started: too big, bad image      error        terminal   -
never started: init failed / timeout   error        function   -
=====================================  ===========  =========  =================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from config.domain import CallStatus, FailureKind, Outcome, Response
from config.errors import AgentError
from worker.agent.driver import DispatchResult
from worker.agent.logbuf import LogBuffer

STATUS_OK = 200
STATUS_FUNCTION_FAILED = 502
STATUS_FUNCTION_TIMEOUT = 504
KEEP_STATUSES = frozenset({STATUS_OK, STATUS_FUNCTION_FAILED, STATUS_FUNCTION_TIMEOUT})
ERROR_EXCERPT_CHARS = 200  # of a failed function's answer, in its call's error
_CONTROL = dict.fromkeys([*range(0x20), 0x7F], "\ufffd")  # left after whitespace is joined


class ExecEnd(StrEnum):
    ANSWERED = "answered"  # the FDK answered with some status
    FAILED = "failed"  # the exchange over the socket broke
    TIMED_OUT = "timed_out"  # ran past the function's timeout
    EXITED = "exited"  # the container died during the call
    CANCELLED = "cancelled"  # stopped on request
    STOPPED = "stopped"  # stopped because the agent shut down


@dataclass(frozen=True, slots=True)
class ExecResult:
    end: ExecEnd
    started_at: datetime
    completed_at: datetime
    result: DispatchResult | None = None
    error: str | None = None
    stats: Mapping[str, float] = field(default_factory=dict)  # the call's use, as it ended


class StopControl:
    """Per call: the stop request (cancel or shutdown) and the dispatch notice."""

    def __init__(
        self,
        on_start: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Done once a stop is requested: a running call waits on it beside its
        # dispatch without a task of its own.
        self.stopped: asyncio.Future[None] = (loop or asyncio.get_running_loop()).create_future()
        self.end = ExecEnd.CANCELLED
        self.reason = ""
        self.started = False
        self.waker: Callable[[], None] | None = None  # wakes the call while it waits for a slot
        self._on_start = on_start
        self.launch_patience_s = 0.0

    @property
    def requested(self) -> bool:
        """A stop has been requested."""
        return self.stopped.done()

    def stop(self, end: ExecEnd, reason: str) -> bool:
        if self.stopped.done():
            return False
        self.end, self.reason = end, reason
        self.stopped.set_result(None)
        if self.waker is not None:
            self.waker()
        return True

    def dispatched(self) -> None:
        """The function's socket has taken the call's connection (once per call)."""
        if self.started:
            return
        self.started = True
        if self._on_start is not None:
            self._on_start()


def _response(result: DispatchResult) -> Response:
    return Response(
        status=result.status, headers=result.headers, body=result.body, truncated=result.truncated
    )


def _answered(result: DispatchResult) -> tuple[CallStatus, str | None, FailureKind | None]:
    if result.status == STATUS_OK and result.truncated:
        # Running it again gives the same oversized answer: no retry can help.
        return (
            CallStatus.ERROR,
            f"function response too large: over the {len(result.body)} byte limit "
            "(FN_MAX_RESPONSE_SIZE); the stored body is cut there",
            FailureKind.TERMINAL,
        )
    if result.status == STATUS_OK:
        return CallStatus.SUCCESS, None, None
    if result.status == STATUS_FUNCTION_FAILED:
        said = _excerpt(result.body)
        error = f"function failed: {said}" if said else "function failed"
        return CallStatus.ERROR, error, FailureKind.FUNCTION
    if result.status == STATUS_FUNCTION_TIMEOUT:
        return CallStatus.TIMEOUT, "the function reported a timeout", FailureKind.FUNCTION
    return (
        CallStatus.ERROR,
        f"invalid function response: status {result.status}",
        FailureKind.FUNCTION,
    )


def _excerpt(body: bytes) -> str:
    """What a failed function said, for the call's error: the start of its body on one
    line (the whole body stays in the response)."""
    text = " ".join(body[: ERROR_EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
    text = text.translate(_CONTROL)
    if len(text) > ERROR_EXCERPT_CHARS:
        return text[: ERROR_EXCERPT_CHARS - 3] + "..."
    return text


_ENDS: dict[ExecEnd, tuple[CallStatus, FailureKind]] = {
    ExecEnd.FAILED: (CallStatus.ERROR, FailureKind.FUNCTION),
    ExecEnd.TIMED_OUT: (CallStatus.TIMEOUT, FailureKind.FUNCTION),
    ExecEnd.EXITED: (CallStatus.ERROR, FailureKind.FUNCTION),
    ExecEnd.CANCELLED: (CallStatus.CANCELLED, FailureKind.CANCELLED),
    ExecEnd.STOPPED: (CallStatus.ERROR, FailureKind.BUSY),
}


def ran_outcome(run: ExecResult, log: LogBuffer, container_id: str, image: str) -> Outcome:
    """The outcome of a call that reached a container."""
    response = None
    if run.end is ExecEnd.ANSWERED and run.result is not None:
        status, error, failure = _answered(run.result)
        response = _response(run.result)
    else:
        status, failure = _ENDS[run.end]
        error = run.error or run.end.value
    return Outcome(
        status=status,
        error=error,
        failure=failure,
        response=response,
        log=log.getvalue(),
        log_truncated=log.truncated,
        container_id=container_id,
        image=image,
        started_at=run.started_at,
        completed_at=run.completed_at,
        stats=MappingProxyType(dict(run.stats)),
    )


def not_started_outcome(exc: AgentError, at: datetime) -> Outcome:
    """The outcome of a call that never reached a container, ending ``at``."""
    failure = getattr(exc, "failure", FailureKind.FUNCTION)
    return Outcome(
        status=CallStatus.ERROR,
        error=str(exc) or type(exc).__name__,
        failure=failure if isinstance(failure, FailureKind) else FailureKind.FUNCTION,
        completed_at=at,
    )


def cancelled_outcome(reason: str, at: datetime) -> Outcome:
    return Outcome(
        status=CallStatus.CANCELLED,
        error=reason,
        failure=FailureKind.CANCELLED,
        completed_at=at,
    )
