"""Statements shared by the SQL backends, with ``:name`` parameters.

SQLite takes them as they are; the PostgreSQL backend rewrites ``:name`` to
``$n``. Every write that touches a call's status carries the same guard,
``calls.status IN ('queued', 'running')``, so that a final state is never
overwritten, whichever order writes arrive in.
"""

from __future__ import annotations

import re

LIVE = "('queued', 'running')"
FINAL = "('success', 'error', 'timeout', 'cancelled')"

FN_COLUMNS = (
    "app", "name", "image", "memory_mb", "cpus_mcpu", "timeout_s", "idle_timeout_s",
    "tmpfs_mb", "config", "max_attempts", "retry_backoff_s", "max_age_s",
    "created_at", "updated_at",
)  # fmt: skip

CALL_COLUMNS = (
    "id", "app", "fn", "image", "status", "error", "failure", "attempts",
    "created_at", "started_at", "completed_at", "updated_at", "next_try_at",
    "worker_id", "container_id", "response_status", "response_headers", "response_body",
    "response_truncated", "log_truncated", "stats", "cancel_requested",
)  # fmt: skip
# The request a call was made with (migration 0003); all NULL when none was stored.
REQUEST_COLUMNS = ("request_body", "request_headers", "request_priority")
# What records read in bulk carry (lists, the running upsert's answer): all but the
# request body, which may be up to FN_MAX_REQUEST_SIZE and is only read by get_call.
RECORD_COLUMNS = (*CALL_COLUMNS, "request_headers", "request_priority")
RECORD_SELECT = ", ".join(RECORD_COLUMNS)
# The columns of the outcome upserts (the request too, for records they create).
OUTCOME_COLUMNS = (*CALL_COLUMNS, *REQUEST_COLUMNS)

TIME_COLUMNS = frozenset(
    {
        "created_at",
        "started_at",
        "completed_at",
        "updated_at",
        "next_try_at",
        "cutoff",
        "since",
        "seen_at",
    }
)


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"
    )


# ------------------------------------------------------------------ registry

FN_INSERT = _insert("fns", FN_COLUMNS) + " ON CONFLICT (app, name) DO NOTHING"
FN_UPDATE = (
    "UPDATE fns SET "
    + ", ".join(f"{c} = :{c}" for c in FN_COLUMNS if c not in {"app", "name", "created_at"})
    + " WHERE app = :app AND name = :name"
)
FN_GET = "SELECT * FROM fns WHERE app = :app AND name = :name"
FN_LIST = "SELECT * FROM fns ORDER BY app, name"
FN_LIST_APP = "SELECT * FROM fns WHERE app = :app ORDER BY name"
FN_DELETE = "DELETE FROM fns WHERE app = :app AND name = :name"

# --------------------------------------------------------------------- calls

CALL_GET = "SELECT * FROM calls WHERE id = :id"
CALL_GET_RECORD = f"SELECT {RECORD_SELECT} FROM calls WHERE id = :id"

QUEUED_COLUMNS = (
    "id", "app", "fn", "image", "status", "attempts", "created_at", "updated_at",
    "next_try_at", *REQUEST_COLUMNS,
)  # fmt: skip
CALL_QUEUED = _insert("calls", QUEUED_COLUMNS) + " ON CONFLICT (id) DO NOTHING"

# A request once stored is kept: a later write only fills it in when there is none
# (``request_headers IS NULL`` marks a call without a stored request).
# (In an upsert's SET, ``calls.x`` is the value before the update.)
KEEP_REQUEST = (
    " request_body = CASE WHEN calls.request_headers IS NULL"
    " THEN excluded.request_body ELSE calls.request_body END,"
    " request_headers = CASE WHEN calls.request_headers IS NULL"
    " THEN excluded.request_headers ELSE calls.request_headers END,"
    " request_priority = CASE WHEN calls.request_headers IS NULL"
    " THEN excluded.request_priority ELSE calls.request_priority END,"
)

RUNNING_COLUMNS = (
    "id", "app", "fn", "status", "attempts", "created_at", "started_at", "updated_at", "worker_id",
    *REQUEST_COLUMNS,
)  # fmt: skip
# After "attempts = ...," in the running upsert: the rest of its SET and its guard.
# The guard leaves alone a record this very mark has made `running` already: the mark
# sent again after its commit's answer was lost (the connection broke) must not count
# its attempt twice. A mark is told apart by its worker and its start time, which
# the write carries unchanged however often it is sent.
RUNNING_SET_REST = (
    KEEP_REQUEST + " started_at = excluded.started_at,"
    " updated_at = excluded.updated_at, worker_id = excluded.worker_id, next_try_at = NULL,"
    " error = NULL, failure = NULL"  # an earlier attempt's or hand-back's, not this one's
    f" WHERE calls.status IN {LIVE}"
    " AND NOT (calls.status = 'running' AND calls.worker_id = excluded.worker_id"
    " AND calls.started_at = excluded.started_at)"
)
CALL_RUNNING = (
    _insert("calls", RUNNING_COLUMNS) + " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " attempts = CASE WHEN :attempt_arg > 0 THEN :attempt_arg ELSE calls.attempts + 1 END,"
    + RUNNING_SET_REST
)


# ``started_at`` is the reported attempt's own: NULL when it never reached a container,
# so the time of a `running` mark (the worker took the call) is not shown as a run.
# ``log_truncated`` goes with the log: a write that keeps the stored log keeps it too.
def _outcome_set(log_truncated: str) -> str:
    return (
        " error = excluded.error, failure = excluded.failure, attempts = excluded.attempts,"
        " image = COALESCE(excluded.image, calls.image), started_at = excluded.started_at,"
        " updated_at = excluded.updated_at,"
        " worker_id = COALESCE(excluded.worker_id, calls.worker_id),"
        " container_id = excluded.container_id, response_status = excluded.response_status,"
        " response_headers = excluded.response_headers, response_body = excluded.response_body,"
        f" response_truncated = excluded.response_truncated, log_truncated = {log_truncated},"
        " stats = excluded.stats," + KEEP_REQUEST
    )


_OUTCOME_SET = _outcome_set("excluded.log_truncated")

# The conflict clauses of the outcome upserts, whatever the rows come from.
FINISH_CONFLICT = (
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    + _OUTCOME_SET
    + " completed_at = excluded.completed_at, next_try_at = NULL"
    f" WHERE calls.status IN {LIVE} RETURNING id"
)


# Back to queued, unless a cancel was asked for while the attempt ran. A retry that
# names a worker (one handing the call back unfinished) puts back only the call's
# `running` record of that worker, never one that has moved on since (to another
# worker, or to its end).
def _retry_conflict(keep_log: bool) -> str:
    """``keep_log``: the retry of an attempt that never started and left no log, which
    keeps the stored log and so whether it was cut."""
    log_truncated = "calls.log_truncated" if keep_log else "excluded.log_truncated"
    return (
        " ON CONFLICT (id) DO UPDATE SET"
        " status = CASE WHEN calls.cancel_requested THEN 'cancelled' ELSE 'queued' END,"
        + _outcome_set(log_truncated)
        + " completed_at = CASE WHEN calls.cancel_requested THEN excluded.updated_at END,"
        " next_try_at = CASE WHEN calls.cancel_requested THEN NULL ELSE excluded.next_try_at END"
        f" WHERE calls.status IN {LIVE} AND (excluded.worker_id IS NULL"
        " OR (calls.status = 'running' AND calls.worker_id = excluded.worker_id)) RETURNING id"
    )


# By whether the retry keeps the stored log (the ``keep_log`` parameter of a RETRY write).
RETRY_CONFLICT = {keep: _retry_conflict(keep) for keep in (False, True)}
CALL_FINISH = _insert("calls", OUTCOME_COLUMNS) + FINISH_CONFLICT
CALL_RETRY = {
    keep: _insert("calls", OUTCOME_COLUMNS) + stmt for keep, stmt in RETRY_CONFLICT.items()
}

# ``fnq calls retry``: a final call with a stored request back to queued, as if new
# (the request, app and fn kept); nothing happens to a live call or one without request.
CALL_REQUEUE = (
    "UPDATE calls SET status = 'queued', image = :image, error = NULL, failure = NULL,"
    " attempts = 0, created_at = :now, started_at = NULL, completed_at = NULL,"
    " updated_at = :now, next_try_at = NULL, worker_id = NULL, container_id = NULL,"
    " response_status = NULL, response_headers = NULL, response_body = NULL,"
    " response_truncated = FALSE, log_truncated = FALSE, stats = NULL,"
    " cancel_requested = FALSE"
    f" WHERE id = :id AND status IN {FINAL} AND (:reopen OR request_headers IS NOT NULL)"
    " RETURNING id"
)


def purge_chunk_ids(status: str) -> str:
    """The read of the ids of the next chunk of ended calls completed before ``:cutoff``,
    oldest first, through the completion index; ``status``: the column as the backend's
    planner should see it."""
    return (
        f"SELECT id FROM calls WHERE {status} IN {FINAL} AND completed_at < :cutoff"
        " ORDER BY completed_at LIMIT :limit"
    )


# Those of a chunk's calls that are still ended before the cutoff (not reopened since
# the chunk was read), deleted.
PURGE_IDS = (
    "DELETE FROM calls WHERE id {ids_in}"
    f" AND status IN {FINAL} AND completed_at < :cutoff RETURNING id"
)

# A queued call is not running: it ends with no run time (a start kept from an attempt
# before its backoff would make the wait look like one).
CALL_CANCEL_QUEUED = (
    "UPDATE calls SET status = 'cancelled', failure = 'cancelled', error = :error,"
    " started_at = NULL, completed_at = :now, updated_at = :now, next_try_at = NULL,"
    " cancel_requested = TRUE"
    " WHERE id = :id AND status = 'queued'"
)
CALL_CANCEL_RUNNING = (
    "UPDATE calls SET cancel_requested = TRUE, updated_at = :now"
    " WHERE id = :id AND status = 'running'"
)

# A live call whose message the queue buried (it will not be delivered again) ends as
# an error, unless its record changed after the burial (requeued and taken again).
CALL_END_BURIED = (
    "UPDATE calls SET status = 'error', failure = 'terminal', error = :error,"
    " completed_at = :now, updated_at = :now, next_try_at = NULL"
    f" WHERE id = :id AND status IN {LIVE} AND updated_at <= :died_at"
)

# Calls of ``ids`` with a cancel requested; ``{ids_in}`` is the backend's way of
# matching a list parameter (SQLite: a JSON array; PostgreSQL: a text[]).
# Calls a worker holds that are to stop: a cancel asked while they ran, or a record
# cancelled while still `queued` (a call waiting for a container is not marked yet).
CANCEL_LOOKUP = (
    "SELECT id FROM calls WHERE (cancel_requested OR status = 'cancelled') AND id {ids_in}"
)
CALLS_GET = "SELECT * FROM calls WHERE id {ids_in}"

# ------------------------------------------------------------------- workers

WORKER_BEAT = (
    "INSERT INTO workers (id, host, pid, started_at, seen_at, info)"
    " VALUES (:id, :host, :pid, :now, :now, :info)"
    " ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
    " seen_at = excluded.seen_at, info = excluded.info"
)
WORKER_GONE = "DELETE FROM workers WHERE id = :id"
WORKER_PRUNE = "DELETE FROM workers WHERE seen_at < :cutoff"
WORKER_LIST = "SELECT * FROM workers WHERE seen_at >= :since ORDER BY host, id"

# ---------------------------------------------------------------------- logs

LOG_PUT = (
    "INSERT INTO logs (call_id, data) VALUES (:call_id, :data)"
    " ON CONFLICT (call_id) DO UPDATE SET data = excluded.data"
)
LOG_GET = "SELECT data FROM logs WHERE call_id = :call_id"
LOG_DELETE = "DELETE FROM logs WHERE call_id = :call_id"


def call_filters(
    app: str | None,
    fn: str | None,
    status: str | None,
    since: object,
    before: tuple[object, str] | None,
    *,
    down_to: tuple[object, str] | None = None,
) -> tuple[str, dict[str, object]]:
    """A WHERE clause (possibly empty) and its parameters for listing and counting.
    ``before``: the calls after a page's last (newest first: older ones); ``down_to``:
    the calls from the newest down to this one (created_at, id), itself included."""
    clauses: list[str] = []
    params: dict[str, object] = {}
    for column, value in (("app", app), ("fn", fn), ("status", status)):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if since is not None:
        clauses.append("created_at >= :since")
        params["since"] = since
    # Each position as a range of created_at that an index can seek to, then the id
    # within its first instant: PostgreSQL reads an OR of the two as a filter only,
    # and would walk the index from the newest call down to the cursor on every page.
    if before is not None:
        clauses.append("created_at <= :before_at AND (created_at < :before_at OR id < :before_id)")
        params["before_at"], params["before_id"] = before
    if down_to is not None:
        clauses.append("created_at >= :edge_at AND (created_at > :edge_at OR id >= :edge_id)")
        params["edge_at"], params["edge_id"] = down_to
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# The listing indexes by the filters they hold (each then orders by created_at, id):
# a page with exactly these filters, and any time range, reads only its own calls.
LISTING_INDEXES = {
    frozenset(): "calls_by_time",
    frozenset({"app"}): "calls_by_app",
    frozenset({"app", "fn"}): "calls_by_fn",
    frozenset({"status"}): "calls_by_status",
}


def walked_filters(given: frozenset[str], status: str | None) -> frozenset[str]:
    """Of the filters ``given``, those of the listing index a page walks (newest
    first); the others are checked on each call the walk reads. A `queued` or
    `running` status goes first: those calls are few, the ended ones are most."""
    if given in LISTING_INDEXES:
        return given
    if status in ("queued", "running"):
        return frozenset({"status"})
    for held in (frozenset({"app", "fn"}), frozenset({"app"}), frozenset({"status"})):
        if held <= given:
            return held
    return frozenset()


_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)")


def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` parameters to ``$1, $2, ...`` and the names in that order."""
    order: list[str] = []

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return _NAMED.sub(repl, sql), tuple(order)
