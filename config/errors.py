"""The root of fnq's exception tree.

::

    FnqError
     +-- ConfigError              settings that do not validate
     +-- QueueError               mq/ (see mq.errors)
     +-- StoreError               datastore/ (see datastore.errors)
     +-- AgentError               worker/agent (see worker.agent.errors)

Each package derives its own errors from the class named here, and marks
whether retrying can help by type (``Retryable`` mix-in), never by message.
"""

from __future__ import annotations


class FnqError(Exception):
    """Base of every error fnq raises on purpose."""


class Retryable:
    """Mix-in: the operation may succeed if tried again later (outage, busy)."""


class ConfigError(FnqError):
    """A setting is missing or has a value fnq cannot use."""


class QueueError(FnqError):
    """A message-queue operation failed."""


class StoreError(FnqError):
    """A datastore or log-store operation failed."""


class AgentError(FnqError):
    """Running a call in a container failed."""


def reason_of(exc: BaseException, timeout_s: float | None = None) -> str:
    """``exc`` in words, for a log line or an error of fnq's own: its message, or for an
    exception that has none (a timeout, most often) what happened, so that a line never
    ends on an empty reason. ``timeout_s``: the time limit a TimeoutError ran out of."""
    text = str(exc)
    if text:
        return text
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:.3g} s" if timeout_s is not None else "timed out"
    return type(exc).__name__
