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
