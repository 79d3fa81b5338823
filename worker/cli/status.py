"""``fnq status``: queue depths, calls by status and the live workers.

It reads the queue and the datastore only: nothing of the worker's runtime is loaded.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import click

from config.domain import CallStatus
from config.errors import FnqError
from config.settings import Settings
from datastore.base import WorkerInfo, open_datastore
from mq.base import open_queue
from worker.cli._common import (
    fail,
    friendly_errors,
    json_option,
    print_json,
    print_table,
    run_async,
    settings_from,
)
from worker.liveness import ALIVE_WITHIN
from worker.rq_open import open_rq

WORKER_HEADERS = ["WORKER", "HOST", "PID", "MEMORY MB", "CPU mCPU", "CONTAINERS", "RUNNING",
                  "WAITING", "SEEN"]  # fmt: skip


RQ_HEADERS = ["RQ QUEUE", "QUEUED", "SCHEDULED", "STARTED", "FAILED"]
# Calls of a status counted at most (unless --exact): past it, "more than" this many.
STATUS_COUNT_CAP = 100_000


async def _status(ctx: click.Context, exact: bool) -> dict[str, Any]:
    settings = settings_from(ctx)
    data: dict[str, Any] = {}
    try:  # calls and workers are worth showing while the queue is down
        queue = open_queue(settings.mq_url, settings, create=False)
        try:
            qs = await queue.stats()
        finally:
            await queue.close()
    except FnqError as exc:
        data["queue_error"] = str(exc)
    else:
        data["queue"] = {"ready": qs.ready, "delayed": qs.delayed, "reserved": qs.reserved,
                         "dead": qs.dead}  # fmt: skip
    data.update(await _rq_status(settings))
    try:  # the queue's depth is worth showing while the datastore is down
        store = await open_datastore(settings, create=False)
        try:
            cap = None if exact else STATUS_COUNT_CAP
            counts = await store.count_by_status(at_most=cap)
            workers = await store.list_workers(ALIVE_WITHIN)
            now = store.clock.now()  # the clock of the workers' heartbeats
        finally:
            await store.close()
    except FnqError as exc:
        data["datastore_error"] = str(exc)
        return data
    data["calls"] = {s.value: min(counts[s], cap or counts[s]) for s in CallStatus}
    data["calls_cap"] = cap
    data["calls_capped"] = [s.value for s in CallStatus if cap is not None and counts[s] > cap]
    data["workers"] = [_worker_json(w, now) for w in workers]
    return data


async def _rq_status(settings: Settings) -> dict[str, Any]:
    """``rq_queues``: the depth of each RQ queue of FN_RQ_QUEUES, or ``rq_error``;
    nothing when there are none."""
    try:
        queue = open_rq(settings)
        if queue is None:
            return {}
        try:
            depths = await queue.depths()
        finally:
            await queue.close()
    except FnqError as exc:  # the rest is worth showing all the same
        return {"rq_error": str(exc)}
    return {"rq_queues": [dataclasses.asdict(d) for d in depths]}


def _worker_json(w: WorkerInfo, now: datetime) -> dict[str, Any]:
    ago = (now - w.seen_at).total_seconds()
    return {**w.to_json(), "seen_s_ago": round(max(ago, 0.0), 1)}


def _used_of(info: dict[str, Any], what: str) -> str:
    used, total = info.get(f"{what}_used"), info.get(f"{what}_total")
    if used is None and total is None:
        return "-"
    return f"{'-' if used is None else used}/{'-' if total is None else total}"


def worker_row(w: dict[str, Any]) -> list[Any]:
    """One line of the workers table (keys as docs/datastore.md lists them; absent: '-')."""
    info = w["info"]
    return [w["id"], w["host"], w["pid"], _used_of(info, "memory_mb"), _used_of(info, "cpu_mcpu"),
            info.get("containers", "-"), info.get("calls_running", "-"),
            info.get("calls_waiting", "-"), f"{w['seen_s_ago']:.0f}s ago"]  # fmt: skip


@click.command("status")
@click.option(
    "--exact",
    is_flag=True,
    help=f"Count all calls of each status (without it a count stops past {STATUS_COUNT_CAP}): "
    "reads the whole calls table, seconds for millions of calls.",
)
@json_option
@click.pass_context
@friendly_errors
def status_cmd(ctx: click.Context, exact: bool, as_json: bool) -> None:
    """Queue depth by state (and the RQ queues'), calls by status and the live workers."""
    data = run_async(_status(ctx, exact))
    if as_json:
        print_json(data)
    else:
        _print_status(data)
    errors = [data[key] for key in ("queue_error", "rq_error", "datastore_error") if key in data]
    for error in errors[:-1]:
        click.echo(f"fnq: {error}", err=True)
    if errors:  # what could be read is shown first
        fail(errors[-1])


def _print_status(data: dict[str, Any]) -> None:
    if "queue" in data:  # else the queue is down: its depth is unknown
        print_table(["QUEUE", "MESSAGES"], list(data["queue"].items()))
        click.echo()
    if data.get("rq_queues"):
        print_table(RQ_HEADERS, [[d["name"], d["queued"], d["scheduled"], d["started"],
                                  d["failed"]] for d in data["rq_queues"]])  # fmt: skip
        click.echo()
    if "calls" not in data:  # the datastore is down: calls and workers are unknown
        return
    capped = set(data["calls_capped"])
    print_table(["STATUS", "CALLS"], [(status, f"more than {n}" if status in capped else n)
                                      for status, n in data["calls"].items()])  # fmt: skip
    click.echo()
    if data["workers"]:
        print_table(WORKER_HEADERS, [worker_row(w) for w in data["workers"]])
    else:
        seconds = ALIVE_WITHIN.total_seconds()
        click.echo(f"no worker seen in the last {seconds:.0f} s")
