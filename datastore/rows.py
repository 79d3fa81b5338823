"""Rows to records and back, the same on every SQL backend."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from config.domain import CallStatus, FailureKind, Function, frozen_map
from datastore import sql
from datastore.base import CallRecord, WorkerInfo


def fn_row(fn: Function) -> dict[str, Any]:
    row = {name: getattr(fn, name) for name in sql.FN_COLUMNS}
    row["config"] = json.dumps(dict(fn.config), sort_keys=True)
    return row


def fn_from_row(row: Mapping[str, Any]) -> Function:
    values = {name: row[name] for name in sql.FN_COLUMNS}
    values["config"] = frozen_map(json.loads(row["config"]))
    values["retry_backoff_s"] = float(row["retry_backoff_s"])
    return Function(**values)


def record_from_row(row: Mapping[str, Any]) -> CallRecord:
    failure = row["failure"]
    body = row["response_body"]
    return CallRecord(
        id=row["id"],
        app=row["app"],
        fn=row["fn"],
        image=row["image"],
        status=CallStatus(row["status"]),
        error=row["error"],
        failure=None if failure is None else FailureKind(failure),
        attempts=int(row["attempts"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
        next_try_at=row["next_try_at"],
        worker_id=row["worker_id"],
        container_id=row["container_id"],
        response_status=row["response_status"],
        response_headers=json.loads(row["response_headers"] or "{}"),
        response_body=b"" if body is None else bytes(body),
        response_truncated=bool(row["response_truncated"]),
        log_truncated=bool(row["log_truncated"]),
        stats=json.loads(row["stats"] or "{}"),
        cancel_requested=bool(row["cancel_requested"]),
        **request_fields(row),
    )


def request_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The CallRecord request fields of ``row`` (its body only if the row carries it)."""
    headers = row.get("request_headers")
    if headers is None:
        return {}
    body = row.get("request_body")
    return {
        "has_request": True,
        "request_body": None if body is None else bytes(body),
        "request_headers": json.loads(headers),
        "request_priority": int(row.get("request_priority") or 0),
    }


def worker_from_row(row: Mapping[str, Any]) -> WorkerInfo:
    info = json.loads(row["info"] or "{}")
    return WorkerInfo(
        id=row["id"],
        host=row["host"],
        pid=int(row["pid"]),
        started_at=row["started_at"],
        seen_at=row["seen_at"],
        info=info if isinstance(info, dict) else {},
    )
