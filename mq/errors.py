"""Errors of the message queue.

::

    QueueError                      (config.errors)
     +-- QueueUnavailable           the backend cannot be reached or is busy; Retryable
     +-- ReservationLost            extend() on a message this consumer no longer holds
     +-- InvalidCall                push() of a call the queue would only dead-letter
"""

from __future__ import annotations

from config.errors import QueueError, Retryable

__all__ = ["InvalidCall", "QueueError", "QueueUnavailable", "ReservationLost"]


class QueueUnavailable(QueueError, Retryable):
    """The queue's server or file did not answer in time; trying later may work."""


class ReservationLost(QueueError):
    """The reservation lapsed and the message went to another consumer (or was acked)."""


class InvalidCall(QueueError):
    """The call breaks the wire format (bad name, priority, header, or too large a body)."""
