"""``fnq calls ...`` and ``fnq logs``: the call records."""

from __future__ import annotations

import base64
import dataclasses
import shlex
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import click
from click.core import ParameterSource

from config.domain import CallStatus
from config.errors import FnqError
from config.settings import Settings
from datastore import reading
from datastore.base import (
    CallFilter,
    CallPage,
    CallRecord,
    Datastore,
    decode_cursor,
    open_datastore,
)
from datastore.errors import InvalidCursor
from datastore.validate import parse_duration, parse_since
from datastore.wait import wait_for_calls
from mq.base import open_queue
from worker.cli._common import (
    WRITE_PATIENCE_S,
    bad_value,
    friendly_errors,
    json_option,
    print_json,
    print_table,
    run_async,
    settings_from,
    short_time,
    wait_status,
    wait_timeout_option,
)

T = TypeVar("T")


def no_call(call_id: str) -> FnqError:
    """The error for an id with no record, with where else it may be."""
    return FnqError(
        f"no call {call_id} (a call gets its record when it is queued with `fnq call`, "
        "else when a worker takes it; a malformed message never does: see `fnq dead list`)"
    )


def with_store(
    settings: Settings, work: Callable[[Datastore], Awaitable[T]], *, create: bool = True
) -> T:
    """``work`` on the datastore; a command that only reads, or changes only what is
    there (cancel, retry, purge, fn update and delete), passes ``create=False``, so
    that a mistyped SQLite path is an error and no empty file is made there."""

    async def run() -> T:
        store = await open_datastore(settings, create=create, write_patience_s=WRITE_PATIENCE_S)
        try:
            return await work(store)
        finally:
            await store.close()

    return run_async(run())


def _duration(rec: CallRecord) -> str:
    if rec.started_at is None or rec.completed_at is None:
        return ""
    return f"{(rec.completed_at - rec.started_at).total_seconds():.3f}s"


def _one_line(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ---------------------------------------------------------------- calls ...


@click.group("calls")
def calls_group() -> None:
    """Inspect, cancel, retry and purge call records."""


def _since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``--since`` as a time; a duration counts back from ``now`` (the datastore's clock
    once it is open: its calls' creation times are read from it)."""
    if text is None:
        return None
    try:
        return parse_since(text, now, local=True)  # a time as the tables show it
    except ValueError as exc:
        raise bad_value("--since", str(exc)) from None


def _cursor(text: str | None) -> str | None:
    if text is not None:
        try:
            decode_cursor(text)
        except InvalidCursor:
            message = f"{text!r} is not a cursor: pass a next_cursor of a previous page"
            raise bad_value("--cursor", message) from None
    return text


@calls_group.command("list")
@click.option("--app")
@click.option("--fn")
@click.option("--status", type=click.Choice([s.value for s in CallStatus]))
@click.option(
    "--since",
    help="Created within a duration (10m, 2h, 1d) or after an ISO time "
    "(without a zone: local time, as CREATED shows it).",
)
@click.option("--limit", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--cursor", help="next_cursor of the previous page.")
@json_option
@click.pass_context
@friendly_errors
def calls_list(
    ctx: click.Context,
    /,
    *,
    app: str | None,
    fn: str | None,
    status: str | None,
    since: str | None,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List calls, newest first."""
    f = CallFilter(app=app, fn=fn, status=CallStatus(status) if status else None,
                   since=_since(since), limit=limit, cursor=_cursor(cursor))  # fmt: skip

    async def page_of(store: Datastore) -> CallPage:
        at = dataclasses.replace(f, since=_since(since, store.clock.now())) if since else f
        return await store.list_calls(at)

    page = with_store(settings_from(ctx), page_of, create=False)
    if as_json:
        print_json({"items": [r.to_json() for r in page.items], "next_cursor": page.next_cursor})
        return
    rows = [(r.id, f"{r.app}/{r.fn}", r.status.value, r.attempts, short_time(r.created_at),
             _duration(r), _one_line(r.error)) for r in page.items]  # fmt: skip
    print_table(["ID", "FUNCTION", "STATUS", "ATTEMPTS", "CREATED", "RAN", "ERROR"], rows)
    if page.next_cursor:
        if len(page.items) < f.limit:  # the walk of its filters stopped (list_calls)
            click.echo(f"({len(page.items)} matched among the {reading.LIST_WALK_MAX} calls "
                       "this page read; older calls may match too)")  # fmt: skip
        click.echo(f"more: {_next_page(ctx, f, page.next_cursor)}")


def _next_page(ctx: click.Context, f: CallFilter, cursor: str) -> str:
    """The command that lists the next page: the same filters, then the cursor."""
    args = ["fnq", "calls", "list"]
    for name in ("app", "fn", "status"):
        if ctx.params[name] is not None:
            args += [f"--{name}", ctx.params[name]]
    if f.since is not None:  # the time it stood for: a duration would move with the clock
        args += ["--since", f.since.isoformat()]
    if ctx.get_parameter_source("limit") is not ParameterSource.DEFAULT:
        args += ["--limit", str(f.limit)]
    return shlex.join([*args, "--cursor", cursor])


@calls_group.command("show")
@click.argument("call_id")
@json_option
@click.pass_context
@friendly_errors
def calls_show(ctx: click.Context, call_id: str, as_json: bool) -> None:
    """Show one call: status, timing, error and response."""
    rec = with_store(settings_from(ctx), lambda s: s.get_call(call_id), create=False)
    if rec is None:
        raise no_call(call_id)
    doc = rec.to_json()
    if as_json:
        print_json(doc)
        return
    response, request = doc.pop("response"), doc.pop("request")
    doc["stats"] = " ".join(f"{k}={v}" for k, v in sorted(rec.stats.items()))
    print_table(["FIELD", "VALUE"], [(k, v) for k, v in doc.items() if v not in (None, "")])
    if request is not None:
        click.echo(f"\nrequest (priority {request['priority']})")
        for key, value in sorted(request["headers"].items()):
            click.echo(f"{key}: {value}")
        click.echo(f"\n{_preview(rec.request_body or b'')}")
    if response is not None:
        click.echo(f"\nresponse {response['status']}"
                   + (" (truncated)" if response["truncated"] else ""))  # fmt: skip
        for key, value in sorted(response["headers"].items()):
            click.echo(f"{key}: {value}")
        click.echo("")
        click.echo(response["body"] if response["body_encoding"] == "utf-8"
                   else f"<{len(rec.response_body)} bytes of binary data; see --json>")  # fmt: skip


@calls_group.command("wait")
@click.argument("call_ids", metavar="ID...", nargs=-1, required=True)
@wait_timeout_option("--timeout", "Seconds to wait at most; 0 = no limit.")
@json_option
@click.pass_context
@friendly_errors
def calls_wait(ctx: click.Context, call_ids: tuple[str, ...], wait_timeout_s: float,
               as_json: bool) -> None:  # fmt: skip
    """Wait until calls have ended; one line per call as it ends.

    Exit status 0 when every call succeeded, 1 when one ended otherwise, 124
    when some had not ended by the timeout."""

    def ended(rec: CallRecord) -> None:
        if not as_json:
            click.echo("  ".join(v for v in (rec.id, rec.status.value, _duration(rec),
                                             _one_line(rec.error)) if v))  # fmt: skip

    limit = wait_timeout_s or None
    waited = with_store(settings_from(ctx), lambda s: wait_for_calls(s, call_ids, limit, ended),
                        create=False)  # fmt: skip
    if as_json:
        print_json([waited.records[i].to_json() if i in waited.records
                    else {"id": i, "status": None} for i in waited.ids])  # fmt: skip
    if waited.pending:
        where = ", ".join(f"{i} ({waited.records[i].status.value})" if i in waited.records
                          else f"{i} (no record yet)" for i in waited.pending)  # fmt: skip
        click.echo(f"fnq: not ended after {wait_timeout_s:g} s: {where}", err=True)
    ctx.exit(wait_status(waited))


@calls_group.command("cancel")
@click.argument("call_ids", metavar="ID...", nargs=-1, required=True)
@click.pass_context
@friendly_errors
def calls_cancel(ctx: click.Context, call_ids: tuple[str, ...]) -> None:
    """Cancel queued calls, or ask running ones to stop; one line per id."""

    async def cancel(store: Datastore) -> int:
        unknown = 0
        for call_id in call_ids:
            before = await store.get_call(call_id)
            if before is not None and before.status is CallStatus.CANCELLED:
                click.echo(f"{call_id} was already cancelled; nothing to do")
                continue
            rec = await store.request_cancel(call_id)
            if rec is None:
                click.echo(f"fnq: {no_call(call_id)}", err=True)
                unknown += 1
            elif rec.status is CallStatus.CANCELLED:
                click.echo(f"{call_id} cancelled")
            elif rec.cancel_requested:
                click.echo(f"{call_id} is held by a worker; asked it to stop")
            else:
                click.echo(f"{call_id} already ended ({rec.status.value}); nothing to cancel")
        return unknown

    if with_store(settings_from(ctx), cancel, create=False):
        ctx.exit(1)


def _preview(body: bytes, width: int = 200) -> str:
    if not body:
        return "<empty body>"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes of binary data; see --json>"
    if len(text) <= width:
        return text
    return f"{text[:width]}… ({len(body)} bytes in all; see --json)"


@calls_group.command("retry")
@click.argument("call_ids", metavar="ID...", nargs=-1, required=True)
@click.pass_context
@friendly_errors
def calls_retry(ctx: click.Context, call_ids: tuple[str, ...]) -> None:
    """Run ended calls again with the request they were made with; prints each id queued."""
    settings = settings_from(ctx)

    async def retry(store: Datastore) -> int:
        queue, failed = open_queue(settings.mq_url, settings), 0
        try:
            for call_id in call_ids:
                try:
                    call = await store.retry_call(call_id)
                except FnqError as exc:
                    click.echo(f"fnq: {exc}", err=True)
                    failed += 1
                    continue
                try:
                    await queue.push(call)
                    await queue.dead_purge([call_id])  # its dead letter, if any, is stale now
                except (FnqError, OSError) as exc:
                    click.echo(f"fnq: {call_id}: recorded as queued but not queued ({exc}); "
                               "cancel it, then retry it again", err=True)  # fmt: skip
                    failed += 1
                    continue
                click.echo(call_id)
        finally:
            await queue.close()
        return failed

    if with_store(settings, retry, create=False):
        ctx.exit(1)


@calls_group.command("purge")
@click.option("--older-than", "older_than", required=True,
              help="Remove ended calls completed longer ago than this (e.g. 7d, 12h).")  # fmt: skip
@click.pass_context
@friendly_errors
def calls_purge(ctx: click.Context, older_than: str) -> None:
    """Delete ended calls and their logs; queued and running calls stay."""
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise bad_value("--older-than", str(exc)) from None

    async def purge(store: Datastore) -> tuple[int, datetime]:
        return await store.purge_calls(age), store.clock.now() - age

    count, before = with_store(settings_from(ctx), purge, create=False)
    cutoff = short_time(before)
    click.echo(f"purged {count} call{'s' if count != 1 else ''} completed before {cutoff}")


# -------------------------------------------------------------------- logs


@click.command("logs")
@click.argument("call_id")
@json_option
@click.pass_context
@friendly_errors
def logs_cmd(ctx: click.Context, call_id: str, as_json: bool) -> None:
    """Print the log (stdout and stderr) of a call; it appears when the call ends."""

    async def fetch(store: Datastore) -> tuple[CallRecord | None, bytes | None]:
        return await store.get_call(call_id), await store.get_log(call_id)

    rec, data = with_store(settings_from(ctx), fetch, create=False)
    if data is None:
        if rec is None:
            raise no_call(call_id)
        if rec.is_final and rec.attempts == 0:
            raise FnqError(f"call {call_id} ended ({rec.status.value}) before it ran, so it has "
                           "no log")  # fmt: skip
        if rec.is_final:
            raise FnqError(f"call {call_id} ended ({rec.status.value}) but its log is missing "
                           "(purged, or the log store lost it)")  # fmt: skip
        raise FnqError(f"call {call_id} is {rec.status.value} and has no log yet "
                       "(logs are stored when a call ends)")  # fmt: skip
    if as_json:
        try:
            print_json({"call_id": call_id, "log": data.decode("utf-8"), "encoding": "utf-8"})
        except UnicodeDecodeError:
            text = base64.b64encode(data).decode()
            print_json({"call_id": call_id, "log": text, "encoding": "base64"})
        return
    click.echo(data, nl=False)
