"""``fnq worker`` and ``fnq status``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import click

from config.domain import CallStatus, utcnow
from config.errors import FnqError
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
from worker.logs import setup_logging
from worker.runtime import serve, setup_sentry


@click.command("worker")
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once the queue is empty (for batch jobs, tests); status 1 if it cannot be reached.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Calls held reserved but not yet running in a container.",
)
@click.pass_context
@friendly_errors
def worker_cmd(ctx: click.Context, burst: bool, prefetch: int) -> None:
    """Run calls from the queue in hot containers until SIGTERM/SIGINT."""
    settings = settings_from(ctx)
    setup_logging(settings)
    setup_sentry(settings)
    run_async(serve(settings, burst=burst, prefetch=prefetch))


# fnq status lists workers whose last heartbeat is at most this old.
STATUS_SEEN_WITHIN = timedelta(seconds=30)
WORKER_HEADERS = ["WORKER", "HOST", "PID", "MEMORY MB", "CPU mCPU", "CONTAINERS", "RUNNING",
                  "WAITING", "SEEN"]  # fmt: skip


async def _status(ctx: click.Context) -> dict[str, Any]:
    settings = settings_from(ctx)
    queue = open_queue(settings.mq_url, settings)
    try:
        qs = await queue.stats()
    finally:
        await queue.close()
    data: dict[str, Any] = {
        "queue": {"ready": qs.ready, "delayed": qs.delayed, "reserved": qs.reserved,
                  "dead": qs.dead},
    }  # fmt: skip
    try:  # the queue's depth is worth showing while the datastore is down
        store = await open_datastore(settings)
        try:
            counts = await store.count_by_status()
            workers = await store.list_workers(STATUS_SEEN_WITHIN)
        finally:
            await store.close()
    except FnqError as exc:
        data["datastore_error"] = str(exc)
        return data
    data["calls"] = {status.value: counts.get(status, 0) for status in CallStatus}
    data["workers"] = [_worker_json(w) for w in workers]
    return data


def _worker_json(w: WorkerInfo) -> dict[str, Any]:
    ago = (utcnow() - w.seen_at).total_seconds()
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
@json_option
@click.pass_context
@friendly_errors
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Queue depth by state, calls by status and the live workers."""
    data = run_async(_status(ctx))
    if as_json:
        print_json(data)
    else:
        print_table(["QUEUE", "MESSAGES"], list(data["queue"].items()))
        click.echo()
    if "datastore_error" in data:  # calls and workers are unknown
        fail(data["datastore_error"])
    if as_json:
        return
    print_table(["STATUS", "CALLS"], list(data["calls"].items()))
    click.echo()
    if data["workers"]:
        print_table(WORKER_HEADERS, [worker_row(w) for w in data["workers"]])
    else:
        seconds = STATUS_SEEN_WITHIN.total_seconds()
        click.echo(f"no worker seen in the last {seconds:.0f} s")
