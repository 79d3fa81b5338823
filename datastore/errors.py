"""Errors of the datastore and the log stores.

::

    StoreError (config.errors)
     +-- InvalidFunction        a function definition fails validation
     +-- FunctionExists         create_fn on an app/name already registered
     +-- FunctionNotFound       update/show of an unknown app/name
     +-- InvalidCursor          a list cursor that this store did not hand out
     +-- StoreClosed            the store was used after close()
     +-- StoreUnavailable       the database cannot be reached (Retryable)
     |    +-- LogStoreDown      the log store cannot take a log for now (read-only, ...)
     |    |    +-- LogStoreFull a log file found no room (no space, no inode, a quota)
     |    +-- LogNotDeleted     a call's old log stayed, so its record was not reopened
     +-- LogRefused             the log store will never take a log under its call's name
     +-- UnsupportedURL         FN_DB_URL / FN_LOG_URL names no known backend
     +-- CallNotFound           retry_call of an unknown call id
     +-- CallNotFinal           retry_call of a call still queued or running
     +-- RequestNotStored       retry_call of a call whose request was not kept
"""

from __future__ import annotations

from config.errors import Retryable, StoreError

__all__ = [
    "CallNotFinal",
    "CallNotFound",
    "FunctionExists",
    "FunctionNotFound",
    "InvalidCursor",
    "InvalidFunction",
    "LogNotDeleted",
    "LogRefused",
    "LogStoreDown",
    "LogStoreFull",
    "RequestNotStored",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "UnsupportedURL",
]


class InvalidFunction(StoreError):
    """A function definition that fnq refuses to store."""


class FunctionExists(StoreError):
    def __init__(self, app: str, name: str) -> None:
        super().__init__(f"function {app}/{name} already exists (use 'fnq fn update')")


class FunctionNotFound(StoreError):
    def __init__(self, app: str, name: str) -> None:
        super().__init__(f"no function {app}/{name} (see 'fnq fn list')")


class InvalidCursor(StoreError):
    def __init__(self, cursor: str) -> None:
        super().__init__(f"invalid cursor {cursor!r}: pass a next_cursor from a previous page")


class StoreClosed(StoreError):
    def __init__(self) -> None:
        super().__init__("the datastore is closed")


class StoreUnavailable(StoreError, Retryable):
    """The database did not answer (down, unreachable, or gave up waiting)."""


class LogStoreDown(StoreUnavailable):
    """The log store cannot take a call's log for now, for a reason of its own and not
    of the log (a read-only file system, no permission, an I/O error, its directory
    missing): the datastore's writes wait until it can (datastore.logroom)."""


class LogStoreFull(LogStoreDown):
    """A call's log found no room in the log store (ENOSPC, EDQUOT): the datastore's
    writes wait for some (datastore.logroom)."""


class LogNotDeleted(StoreUnavailable):
    """A final call's old log could not be deleted from the log store, so its record
    was left as it was rather than reopened (retried, or its dead letter requeued):
    the log of the run to come would have been that old one until the run ended."""


class LogRefused(StoreError):
    """The log store refuses the name of a call's log (too long for its file system,
    or characters it does not take): no wait would store it. The call's record is
    stored without it (datastore.recording)."""


class UnsupportedURL(StoreError):
    """A store URL with a scheme fnq has no backend for."""


class CallNotFound(StoreError):
    def __init__(self, call_id: str) -> None:
        super().__init__(f"no call {call_id}")


class CallNotFinal(StoreError):
    """retry_call on a call that is still queued or running."""

    def __init__(self, call_id: str, status: str) -> None:
        super().__init__(f"call {call_id} is still {status}; cancel it first")


class RequestNotStored(StoreError):
    """retry_call on a call whose request was never stored."""

    def __init__(self, call_id: str) -> None:
        super().__init__(
            f"call {call_id} has no stored request to run again (recorded before fnq kept "
            "requests, or its body was over FN_MAX_REQUEST_SIZE)"
        )
