"""The reads of call records: one call, a page of calls, counts by status, a log.

Part of the SQL datastore (datastore.common): records come back as
:class:`CallRecord`, lists newest first, a page at most ``LIST_WALK_MAX``
calls deep into an index that does not hold all of its filters.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from config.domain import CallStatus
from datastore import sql
from datastore.backend import SqlBackend
from datastore.base import (
    CallFilter,
    CallPage,
    CallRecord,
    clamp_limit,
    decode_cursor,
    encode_cursor,
)
from datastore.rows import record_from_row

# The calls a page of a list reads at most when no one index holds all of its filters.
LIST_WALK_MAX = 100_000


class CallReads(SqlBackend):
    """The reading part of a SQL datastore."""

    async def get_call(self, call_id: str) -> CallRecord | None:
        rows = await self._fetch_one(sql.CALL_GET, {"id": call_id})
        return record_from_row(rows[0]) if rows else None

    async def get_calls(self, call_ids: Sequence[str]) -> dict[str, CallRecord]:
        if not call_ids:
            return {}
        query = sql.CALLS_GET.format(ids_in=self.IDS_IN)
        rows = await self._fetch_one(query, {"ids": self._id_list(call_ids)})
        records = (record_from_row(row) for row in rows)
        return {record.id: record for record in records}

    async def list_calls(self, f: CallFilter) -> CallPage:
        """A page of calls, newest first.

        When no one listing index holds all of the filters, the page walks the index
        of some of them and checks the others on each call it reads, down to the
        ``LIST_WALK_MAX``-th call of that index at most: the page may then hold fewer
        than ``f.limit`` calls and still have a cursor, that of the last call it read.
        That call is found first, so that calls written meanwhile are read or not,
        but never skipped."""
        before = decode_cursor(f.cursor) if f.cursor else None
        limit = clamp_limit(f.limit)
        status = None if f.status is None else CallStatus(f.status).value
        values = {"app": f.app, "fn": f.fn, "status": status}
        given = frozenset(name for name, value in values.items() if value is not None)
        walked = sql.walked_filters(given, status)
        on = {name: value if name in walked else None for name, value in values.items()}
        where, params = sql.call_filters(on["app"], on["fn"], on["status"], f.since, before)
        if walked == given:  # one index holds them all: the page reads its own calls only
            query = f"SELECT {sql.RECORD_SELECT} FROM calls{where}{_NEWEST_FIRST} LIMIT :limit"
            rows = await self._fetch(query, {**params, "limit": limit + 1})
            return _page(rows, limit, None)
        index = sql.LISTING_INDEXES[walked]
        found = await self._fetch(
            f"SELECT created_at, id FROM {self._walking(index)}{where}{_NEWEST_FIRST}"
            " LIMIT 1 OFFSET :skip",
            {**params, "skip": LIST_WALK_MAX - 1},
        )
        edge = (found[0]["created_at"], found[0]["id"]) if found else None
        where, params = sql.call_filters(f.app, f.fn, status, f.since, before, down_to=edge)
        params["limit"] = limit + 1
        query = (
            f"SELECT {sql.RECORD_SELECT} FROM {self._walking(index)}{where}{_NEWEST_FIRST}"
            " LIMIT :limit"
        )
        return _page(await self._fetch(query, params), limit, edge)

    def _walking(self, index: str) -> str:
        """The FROM of a read that walks ``index``. A planner with statistics may walk
        another listing index instead: each holds created_at after its filters, so
        the page reads at most the calls down to the edge's time, in any of them."""
        return "calls"

    async def count_by_status(
        self, app: str | None = None, fn: str | None = None, *, at_most: int | None = None
    ) -> dict[CallStatus, int]:
        where, params = sql.call_filters(app, fn, None, None, None)
        if at_most is None:  # every call of the table (or of the app) is read
            query = f"SELECT status, COUNT(*) AS n FROM calls{where} GROUP BY status"
        else:  # each status's count stops at at_most + 1: a bounded walk of its index
            also = where.replace(" WHERE ", " AND ", 1)
            query = " UNION ALL ".join(
                f"SELECT '{s.value}' AS status, COUNT(*) AS n FROM (SELECT 1 AS one FROM calls"
                f" WHERE status = '{s.value}'{also} LIMIT :cap) AS {s.value}_calls"
                for s in CallStatus
            )
            params["cap"] = at_most + 1
        rows = await self._fetch(query, params)
        counts = dict.fromkeys(CallStatus, 0)
        for row in rows:
            counts[CallStatus(row["status"])] = int(row["n"])
        return counts

    async def get_log(self, call_id: str) -> bytes | None:
        if self._external_logs is not None:
            return await self._external_logs.get_log(call_id)
        rows = await self._fetch(sql.LOG_GET, {"call_id": call_id})
        return bytes(rows[0]["data"]) if rows else None

    async def cancel_requested(self, call_ids: Sequence[str]) -> set[str]:
        if not call_ids:
            return set()
        query = sql.CANCEL_LOOKUP.format(ids_in=self.IDS_IN)
        rows = await self._fetch(query, {"ids": self._id_list(call_ids)})
        return {row["id"] for row in rows}


_NEWEST_FIRST = " ORDER BY created_at DESC, id DESC"


def _page(rows: list[dict[str, Any]], limit: int, edge: tuple[datetime, str] | None) -> CallPage:
    """The page of the first ``limit`` of ``rows`` (read with ``limit + 1``); ``edge``:
    the last call its walk read, when the walk stopped short of the end."""
    items = [record_from_row(row) for row in rows[:limit]]
    if len(rows) > limit:
        return CallPage(items, encode_cursor(items[-1].created_at, items[-1].id))
    return CallPage(items, None if edge is None else encode_cursor(*edge))
