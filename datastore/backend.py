"""What a SQL backend supplies, and the state the datastore's rules share.

A backend supplies four things: ``_write`` (one named write, batched into a
group-commit transaction), ``_write_now`` (one write in a transaction of its
own that fails rather than waits out an outage), ``_fetch`` (a read, times
decoded to aware datetimes) and ``_close_backend``. :class:`SqlBackend`
declares them; the rules written above them (datastore.common and the parts it
is made of) only call them.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, ClassVar

from config.domain import Function
from config.settings import Settings
from datastore.base import CallRecord, LogStore
from datastore.batch import GroupCommit
from datastore.clock import StoreClock
from datastore.logroom import PatientLogs

CLOSE_TIMEOUT_S = 10.0
WORKER_WRITE_TIMEOUT_S = 5.0  # a heartbeat gives up after this; the next one tries again


class Write(StrEnum):
    """The writes a backend must know how to run inside a batch transaction."""

    FN_INSERT = "fn_insert"  # -> bool (False: already exists)
    FN_UPDATE = "fn_update"  # -> bool (False: no such function)
    FN_DELETE = "fn_delete"  # -> bool
    QUEUED = "queued"  # -> None
    RUNNING = "running"  # -> stored row (dict)
    FINISH = "finish"  # -> bool (False: already final); log stored alongside if given
    RETRY = "retry"  # -> bool; log stored alongside if given
    CANCEL = "cancel"  # -> stored row or None
    END_BURIED = "end_buried"  # -> bool (False: no live record from before the burial)
    REQUEUE = "requeue"  # -> bool (False: not final, or no request unless :reopen); log deleted
    PURGE = "purge"  # -> list of deleted ids (their logs go by cascade)
    PURGE_IDS = "purge_ids"  # -> list of deleted ids among :ids (still ended before :cutoff)
    LOG_PUT = "log_put"  # -> None
    LOG_DELETE = "log_delete"  # -> None (params: call_ids)
    # not batched: through _write_now
    WORKER_BEAT = "worker_beat"  # -> None
    WORKER_GONE = "worker_gone"  # -> bool
    WORKER_PRUNE = "worker_prune"  # -> int (rows deleted)


class SqlBackend(abc.ABC):
    """The backend hooks and the state shared by the parts of a SQL datastore."""

    # How the backend matches ``id`` against the list parameter ``:ids``.
    IDS_IN: ClassVar[str] = "= ANY(:ids)"
    writer: GroupCommit[Any]  # the backend's batches

    def __init__(self, settings: Settings, logs: LogStore | None) -> None:
        self.settings = settings
        self._external_logs = logs
        # The external store's log writes, each waiting until the store can take it.
        self._log_room = None if logs is None else PatientLogs(logs)
        # Every time stored, and every one compared with a stored one (datastore.clock).
        self.clock = StoreClock()
        self.close_timeout_s = CLOSE_TIMEOUT_S
        self.worker_write_timeout_s = WORKER_WRITE_TIMEOUT_S
        self._closed = False

    # ------------------------------------------------------ backend hooks
    @abc.abstractmethod
    async def _write(self, kind: Write, params: dict[str, Any], log: bytes | None = None) -> Any:
        """Run one write in the next batch transaction; return once it is durable."""

    @abc.abstractmethod
    async def _write_now(self, kind: Write, params: dict[str, Any]) -> Any:
        """Run one write now in a transaction of its own, outside the batches; raise
        StoreUnavailable rather than wait when the database cannot be reached."""

    def _id_list(self, ids: Sequence[str]) -> Any:
        """``ids`` as the ``:ids`` parameter of ``IDS_IN``."""
        return list(ids)

    @abc.abstractmethod
    async def _fetch(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one read; time columns come back as aware datetimes."""

    async def _fetch_one(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """A read of a few rows by their keys (a backend may have a quicker way)."""
        return await self._fetch(query, params)

    @abc.abstractmethod
    async def _close_backend(self) -> None: ...

    async def read_clock(self) -> None:
        """Read the datastore's clock again (``clock``); SQLite's is the host's own."""
        return None

    def give_up_writes_after(self, seconds: float | None) -> None:
        """A write (a batch, a call's log) that could not be made for ``seconds`` fails
        with StoreUnavailable; None: it waits as long as the outage lasts."""
        self.writer.give_up_after_s = seconds
        if self._log_room is not None:
            self._log_room.give_up_after_s = seconds

    # ------------------------------------------ reads the other parts build on
    @abc.abstractmethod
    async def get_fn(self, app: str, name: str) -> Function | None:
        """The function ``app``/``name`` as registered (datastore.common)."""

    @abc.abstractmethod
    async def get_call(self, call_id: str) -> CallRecord | None:
        """The record of call ``call_id`` (datastore.reading)."""
