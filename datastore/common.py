"""The datastore's rules, written once above the SQL backends.

A backend supplies four things (datastore.backend): ``_write``, ``_write_now``,
``_fetch`` and ``_close_backend``. Everything else — validation, log and
response bounds, paging, where logs go — lives above them, in the parts
:class:`SqlDatastore` is made of: the writes of a call's life
(datastore.recording), the reads of call records (datastore.reading), workers'
rows and the purge (datastore.upkeep), and here the function registry, where
call logs live, and closing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any, ClassVar

from config.domain import Function
from datastore import sql
from datastore.backend import Write
from datastore.base import LogStore, bound_log
from datastore.errors import FunctionExists, FunctionNotFound
from datastore.reading import CallReads
from datastore.recording import CallRecording
from datastore.rows import fn_from_row, fn_row
from datastore.upkeep import Upkeep
from datastore.validate import apply_changes, validate_function


class SqlDatastore(CallRecording, CallReads, Upkeep):
    """The Datastore protocol for SQL backends; subclasses only store."""

    # The functions named by the parameters of ``_fn_keys``, each found by its key.
    FNS_GET: ClassVar[str] = (
        "SELECT fns.* FROM unnest(CAST(:apps AS text[]), CAST(:names AS text[])) AS k (app, name)"
        " JOIN fns ON fns.app = k.app AND fns.name = k.name"
    )

    @property
    def logs(self) -> LogStore:
        """Where call logs live: the external store, or this database's own table."""
        return self._external_logs or TableLogStore(self)

    # ------------------------------------------------------------ registry
    async def create_fn(self, fn: Function) -> Function:
        now = self.clock.now()
        fn = dataclasses.replace(validate_function(fn), created_at=now, updated_at=now)
        if not await self._write(Write.FN_INSERT, fn_row(fn)):
            raise FunctionExists(fn.app, fn.name)
        return fn

    async def update_fn(self, app: str, name: str, **changes: Any) -> Function:
        current = await self.get_fn(app, name)
        if current is None:
            raise FunctionNotFound(app, name)
        # Later than the definition it replaces, whatever clock wrote that one: which
        # definition is the newest is told by it (Agent.definition_read).
        now = self.clock.now()
        if current.updated_at is not None and now <= current.updated_at:
            now = current.updated_at + timedelta(microseconds=1)
        fn = dataclasses.replace(apply_changes(current, changes), updated_at=now)
        if not await self._write(Write.FN_UPDATE, fn_row(fn)):
            raise FunctionNotFound(app, name)
        return fn

    async def get_fn(self, app: str, name: str) -> Function | None:
        rows = await self._fetch(sql.FN_GET, {"app": app, "name": name})
        return fn_from_row(rows[0]) if rows else None

    async def get_fns(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], Function]:
        if not keys:
            return {}
        rows = await self._fetch(self.FNS_GET, self._fn_keys(keys))
        found = (fn_from_row(row) for row in rows)
        return {(fn.app, fn.name): fn for fn in found}

    def _fn_keys(self, keys: Collection[tuple[str, str]]) -> dict[str, Any]:
        """``keys`` as the parameters of ``FNS_GET``."""
        return {"apps": [app for app, _ in keys], "names": [name for _, name in keys]}

    async def list_fns(self, app: str | None = None) -> list[Function]:
        if app is None:
            rows = await self._fetch(sql.FN_LIST, {})
        else:
            rows = await self._fetch(sql.FN_LIST_APP, {"app": app})
        return [fn_from_row(row) for row in rows]

    async def delete_fn(self, app: str, name: str) -> bool:
        return bool(await self._write(Write.FN_DELETE, {"app": app, "name": name}))

    async def close(self) -> None:
        """Flush pending writes (within ``close_timeout_s``) and let go; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._log_room is not None:
                # Logs still waiting are given up first: their records could
                # not follow them into batches that are closing.
                self._log_room.close()
            await self._close_backend()
        finally:
            if self._external_logs is not None:
                await self._external_logs.close()


class TableLogStore:
    """The LogStore view of a SQL datastore's own ``logs`` table.

    A log row belongs to a call row (deleting the call deletes its log), so
    ``put_log`` needs the call to be recorded first.
    """

    def __init__(self, store: SqlDatastore) -> None:
        self._store = store

    async def put_log(self, call_id: str, data: bytes) -> None:
        limit = self._store.settings.max_log_size_bytes
        params = {"call_id": call_id, "data": bound_log(data, limit)}
        await self._store._write(Write.LOG_PUT, params)

    async def get_log(self, call_id: str) -> bytes | None:
        return await self._store.get_log(call_id)

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        await self._store._write(Write.LOG_DELETE, {"call_ids": list(call_ids)})

    async def close(self) -> None:
        return None
