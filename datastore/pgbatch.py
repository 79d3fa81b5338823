"""PostgreSQL group commit: a batch of call writes in a few set-based statements.

Sending a batch one statement per write costs one round trip per write, so a
batch of 64 completions paid for 128 of them. Here the call writes of a batch
(queued, running, outcome, retry) go as one statement per kind, the rows
passed as arrays and expanded with ``unnest``; each statement keeps the
single-row statement's conflict clause, so the status rules are the same,
and reports per row what it did (``RETURNING``), so each caller still learns
its own result. The request a call was made with rides in the queued and
running statements (and in an outcome for a call that never ran), so keeping
it costs no statement of its own.

An ``INSERT ... ON CONFLICT DO UPDATE`` may touch a row only once, so writes
for the same call in one batch go to successive rounds (its first write in
round 1, its second in round 2, ...), which also keeps their order. Writes of
other kinds (functions, cancel, purge, logs) are rare and run one statement
each, in their place: the grouped writes before them are flushed first.

A batch of completions thus costs two statements (running, outcome) plus
BEGIN and COMMIT whatever its size (one more when some of its calls had
already ended); a batch that comes down to one statement runs without the
explicit transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from datastore import sql
from datastore.backend import Write
from datastore.batch import Failed
from datastore.errors import StoreError

Op = tuple[Write, dict[str, Any], bytes | None]
ApplyOne = Callable[[Any, Write, dict[str, Any], bytes | None], Awaitable[Any]]

GROUPED = frozenset({Write.QUEUED, Write.RUNNING, Write.FINISH, Write.RETRY})

# Column types of ``calls`` (migrations/postgres), for the typed arrays.
_TYPES = {
    "id": "text", "app": "text", "fn": "text", "image": "text", "status": "text",
    "error": "text", "failure": "text", "attempts": "integer",
    "created_at": "timestamptz", "started_at": "timestamptz", "completed_at": "timestamptz",
    "updated_at": "timestamptz", "next_try_at": "timestamptz", "worker_id": "text",
    "container_id": "text", "response_status": "integer", "response_headers": "text",
    "response_body": "bytea", "response_truncated": "boolean", "log_truncated": "boolean",
    "stats": "text", "cancel_requested": "boolean",
    "request_body": "bytea", "request_headers": "text", "request_priority": "integer",
}  # fmt: skip


def _insert_many(columns: Sequence[str]) -> str:
    """``INSERT INTO calls`` from one array parameter per column ($1 is always the ids)."""
    arrays = ", ".join(f"${n}::{_TYPES[c]}[]" for n, c in enumerate(columns, 1))
    names = ", ".join(columns)
    return f"INSERT INTO calls ({names}) SELECT * FROM unnest({arrays}) AS u({names})"


QUEUED_MANY = _insert_many(sql.QUEUED_COLUMNS) + " ON CONFLICT (id) DO NOTHING"


def _running_many(attempts: str) -> str:
    return (
        _insert_many(sql.RUNNING_COLUMNS)
        + " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
        + f" attempts = {attempts},"
        + sql.RUNNING_SET_REST
        + f" RETURNING {sql.RECORD_SELECT}"
    )


# attempt given (> 0): that number; attempt 0: the stored count plus one.
RUNNING_MANY = {
    True: _running_many("excluded.attempts"),
    False: _running_many("calls.attempts + 1"),
}
# The rows the upsert left alone (calls already final), as they are: a second
# statement, needed only when some call of the batch had ended already.
CALLS_BY_ID = (
    "SELECT "
    + ", ".join(f"c.{name}" for name in sql.RECORD_COLUMNS)
    + " FROM unnest($1::text[]) AS q(id) JOIN calls c ON c.id = q.id"
)


def _outcome_many(conflict: str) -> str:
    logs = f"${len(sql.OUTCOME_COLUMNS) + 1}::bytea[]"
    return (
        f"WITH done AS ({_insert_many(sql.OUTCOME_COLUMNS)}{conflict}),"
        " stored AS (INSERT INTO logs (call_id, data) SELECT l.id, l.data"
        f" FROM unnest($1::text[], {logs}) AS l(id, data) JOIN done USING (id)"
        " WHERE l.data IS NOT NULL"
        " ON CONFLICT (call_id) DO UPDATE SET data = excluded.data)"
        " SELECT id FROM done"
    )


# By kind, and for retries whether the stored log is kept (see sql.RETRY_CONFLICT).
OUTCOME_MANY = {(Write.FINISH, False): _outcome_many(sql.FINISH_CONFLICT),
                (Write.RETRY, False): _outcome_many(sql.RETRY_CONFLICT[False]),
                (Write.RETRY, True): _outcome_many(sql.RETRY_CONFLICT[True])}  # fmt: skip


def _arrays(params: list[dict[str, Any]], columns: Sequence[str]) -> list[list[Any]]:
    return [[p[c] for p in params] for c in columns]


async def _queued(conn: Any, ops: list[Op], timeout_s: float) -> list[Any]:
    params = [p for _, p, _ in ops]
    await conn.execute(QUEUED_MANY, *_arrays(params, sql.QUEUED_COLUMNS), timeout=timeout_s)
    return [None] * len(ops)


async def _running(conn: Any, ops: list[Op], counted: bool, timeout_s: float) -> list[Any]:
    params = [p for _, p, _ in ops]
    arrays = _arrays(params, sql.RUNNING_COLUMNS)
    rows = await conn.fetch(RUNNING_MANY[counted], *arrays, timeout=timeout_s)
    by_id = {row["id"]: dict(row) for row in rows}
    untouched = [p["id"] for p in params if p["id"] not in by_id]
    if untouched:
        rows = await conn.fetch(CALLS_BY_ID, untouched, timeout=timeout_s)
        by_id.update((row["id"], dict(row)) for row in rows)
    missing = Failed(StoreError("running: the call was deleted meanwhile"))
    return [by_id.get(p["id"], missing) for p in params]


async def _outcome(
    conn: Any, key: tuple[Write, bool], ops: list[Op], timeout_s: float
) -> list[Any]:
    params = [p for _, p, _ in ops]
    arrays = [*_arrays(params, sql.OUTCOME_COLUMNS), [log for _, _, log in ops]]
    rows = await conn.fetch(OUTCOME_MANY[key], *arrays, timeout=timeout_s)
    done = {row["id"] for row in rows}
    return [p["id"] in done for p in params]


def _group_key(op: Op) -> tuple[Write, bool]:
    """The statement ``op`` goes to: its kind, and for a `running` mark whether it names
    the attempt, for a retry whether it keeps the stored log."""
    kind, p, _ = op
    if kind is Write.RUNNING:
        return kind, p["attempt_arg"] > 0
    return kind, kind is Write.RETRY and bool(p.get("keep_log"))


def rounds(indices: Sequence[int], ops: Sequence[Op]) -> list[dict[tuple[Write, bool], list[int]]]:
    """``indices`` (grouped writes) by round, then by statement; a call appears once a round.

    Within a statement the rows go in call id order, so concurrent batches (other
    workers) lock the rows they share in the same order.
    """
    seen: dict[str, int] = {}
    out: list[dict[tuple[Write, bool], list[int]]] = []
    for i in indices:
        call_id = ops[i][1]["id"]
        r = seen.get(call_id, 0)
        seen[call_id] = r + 1
        if r == len(out):
            out.append({})
        out[r].setdefault(_group_key(ops[i]), []).append(i)
    for by_statement in out:
        for group in by_statement.values():
            group.sort(key=lambda i: ops[i][1]["id"])
    return out


async def _run_group(
    conn: Any, key: tuple[Write, bool], ops: list[Op], timeout_s: float
) -> list[Any]:
    kind, variant = key
    if kind is Write.QUEUED:
        return await _queued(conn, ops, timeout_s)
    if kind is Write.RUNNING:
        return await _running(conn, ops, variant, timeout_s)
    return await _outcome(conn, key, ops, timeout_s)


def statements(ops: Sequence[Op]) -> int:
    """How many writing statements ``run`` sends for ``ops`` (1: no explicit transaction
    needed; the read of calls already final that may follow changes nothing)."""
    if any(kind not in GROUPED for kind, _, _ in ops):
        return 2  # single writes may take several statements; keep the transaction
    return sum(len(r) for r in rounds(range(len(ops)), ops))


async def run(conn: Any, ops: list[Op], apply_one: ApplyOne, timeout_s: float) -> list[Any]:
    """All of ``ops`` on ``conn`` (inside the caller's transaction); results in order."""
    results: list[Any] = [None] * len(ops)
    pending: list[int] = []

    async def flush() -> None:
        for by_statement in rounds(pending, ops):
            for key, indices in by_statement.items():
                done = await _run_group(conn, key, [ops[i] for i in indices], timeout_s)
                for i, result in zip(indices, done, strict=True):
                    results[i] = result
        pending.clear()

    for i, (kind, p, log) in enumerate(ops):
        if kind in GROUPED:
            pending.append(i)
            continue
        await flush()
        results[i] = await apply_one(conn, kind, p, log)
    await flush()
    return results
