"""Rows kept up apart from the calls' own writes: each live worker's, and the
purge of calls ended long enough ago.

Part of the SQL datastore (datastore.common). A worker's writes are not
batched and never wait out an outage: they fail within
``worker_write_timeout_s``. A purge goes in chunks of ``PURGE_CHUNK`` calls;
with logs kept apart, each chunk's logs go before its records.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar

from datastore import sql
from datastore.backend import SqlBackend, Write
from datastore.base import LogStore, WorkerInfo
from datastore.errors import StoreClosed, StoreUnavailable
from datastore.rows import worker_from_row

PURGE_CHUNK = 500


class Upkeep(SqlBackend):
    """The workers' rows and the purge of a SQL datastore."""

    # The ids of the next chunk of ended calls completed before ``:cutoff``, oldest first.
    PURGE_CHUNK_IDS: ClassVar[str] = sql.purge_chunk_ids("status")

    # -------------------------------------------------------- live workers
    async def worker_heartbeat(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Upsert the worker's row with seen_at = now.

        ``host`` and ``pid`` are this process's unless ``info`` carries them; the
        rest of ``info`` is stored as JSON (values JSON cannot hold become strings).
        Not batched and never waits out an outage: any failure is a StoreError
        raised within ``worker_write_timeout_s`` (StoreUnavailable when the database
        cannot be reached, StoreClosed after close), for the caller to log.
        """
        details = dict(info)
        host, pid = details.pop("host", None), details.pop("pid", None)
        params = {
            "id": worker_id,
            "host": host if isinstance(host, str) and host else socket.gethostname(),
            "pid": pid if isinstance(pid, int) else os.getpid(),
            "now": self.clock.now(),
            "info": json.dumps(details, sort_keys=True, default=str),
        }
        await self._worker_write(Write.WORKER_BEAT, params)

    async def worker_gone(self, worker_id: str) -> None:
        """Delete the worker's row (clean shutdown); fails like ``worker_heartbeat``."""
        await self._worker_write(Write.WORKER_GONE, {"id": worker_id})

    async def list_workers(self, seen_within: timedelta) -> list[WorkerInfo]:
        """Workers whose last heartbeat is at most ``seen_within`` old, by host and id."""
        rows = await self._fetch(sql.WORKER_LIST, {"since": self.clock.now() - seen_within})
        return [worker_from_row(row) for row in rows]

    async def prune_workers(self, older_than: timedelta) -> int:
        """Delete workers not seen for ``older_than`` (they died); return how many."""
        cutoff = self.clock.now() - older_than
        return int(await self._worker_write(Write.WORKER_PRUNE, {"cutoff": cutoff}))

    async def _worker_write(self, kind: Write, params: dict[str, Any]) -> Any:
        if self._closed:
            raise StoreClosed()
        try:
            return await asyncio.wait_for(
                self._write_now(kind, params), self.worker_write_timeout_s
            )
        except TimeoutError:
            raise StoreUnavailable(
                f"the datastore did not answer within {self.worker_write_timeout_s:g} s"
            ) from None

    # ----------------------------------------------------------- retention
    async def purge_calls(self, older_than: timedelta) -> int:
        cutoff = self.clock.now() - older_than
        if self._external_logs is not None:
            return await self._purge_logs_first(self._external_logs, cutoff)
        total = 0
        while True:  # each chunk's logs go with its records, by cascade
            ids: list[str] = await self._write(
                Write.PURGE, {"cutoff": cutoff, "limit": PURGE_CHUNK}
            )
            total += len(ids)
            if len(ids) < PURGE_CHUNK:
                return total

    async def _purge_logs_first(self, logs: LogStore, cutoff: datetime) -> int:
        """Purge with logs kept apart: each chunk's logs are deleted before its records.
        A failure leaves those records (some perhaps without their log, harmless for a
        call on its way out) for a later purge to take again; never a log that no
        record leads to."""
        total = 0
        while True:
            chunk = await self._fetch(
                self.PURGE_CHUNK_IDS, {"cutoff": cutoff, "limit": PURGE_CHUNK}
            )
            ids = [row["id"] for row in chunk]
            if ids:
                await logs.delete_logs(ids)
                # A call reopened meanwhile is no longer ended, and stays.
                params = {"ids": self._id_list(ids), "cutoff": cutoff}
                total += len(await self._write(Write.PURGE_IDS, params))
            if len(ids) < PURGE_CHUNK:
                return total
