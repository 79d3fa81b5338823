"""``fnq fn ...``, ``fnq calls ...`` and ``fnq logs``: the registry and call records."""

from __future__ import annotations

import base64
import shlex
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from config.domain import CallStatus, Function, utcnow
from config.errors import FnqError
from config.settings import Settings
from datastore.base import CallFilter, CallRecord, Datastore, open_datastore
from datastore.errors import FunctionNotFound
from datastore.validate import parse_config, parse_duration, parse_since
from mq.base import open_queue
from worker.cli._common import (
    friendly_errors,
    json_option,
    print_json,
    print_table,
    run_async,
    settings_from,
)

T = TypeVar("T")


def no_call(call_id: str) -> FnqError:
    """The error for an id with no record, with where else it may be."""
    return FnqError(
        f"no call {call_id} (a call gets its record when it is queued with `fnq call`, "
        "else when a worker takes it; a malformed message never does: see `fnq dead list`)"
    )


def with_store(settings: Settings, work: Callable[[Datastore], Awaitable[T]]) -> T:
    async def run() -> T:
        store = await open_datastore(settings)
        try:
            return await work(store)
        finally:
            await store.close()

    return run_async(run())


def fn_to_json(fn: Function) -> dict[str, Any]:
    return {
        "app": fn.app, "name": fn.name, "image": fn.image, "memory_mb": fn.memory_mb,
        "cpus_mcpu": fn.cpus_mcpu, "timeout_s": fn.timeout_s,
        "idle_timeout_s": fn.idle_timeout_s, "tmpfs_mb": fn.tmpfs_mb,
        "config": dict(fn.config), "max_attempts": fn.max_attempts,
        "retry_backoff_s": fn.retry_backoff_s, "max_age_s": fn.max_age_s,
        "created_at": fn.created_at.isoformat() if fn.created_at else None,
        "updated_at": fn.updated_at.isoformat() if fn.updated_at else None,
    }  # fmt: skip


def _short_time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(rec: CallRecord) -> str:
    if rec.started_at is None or rec.completed_at is None:
        return ""
    return f"{(rec.completed_at - rec.started_at).total_seconds():.3f}s"


def _one_line(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ------------------------------------------------------------------- fn ...


def _fn_options(required_image: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    options = [
        click.option("--image", required=required_image, help="Docker image, e.g. team/fn:1.0."),
        click.option("--memory", "memory_mb", type=int, help="Memory in MB (1..8192)."),
        click.option("--cpus", "cpus_mcpu", type=int, help="CPU quota in milli-CPUs; 0 = none."),
        click.option("--timeout", "timeout_s", type=int, help="Longest run in seconds (1..3600)."),
        click.option("--idle-timeout", "idle_timeout_s", type=int,
                     help="Seconds a hot container waits idle for its next call (1..3600)."),
        click.option("--tmpfs", "tmpfs_mb", type=int, help="Size of /tmp in MB; 0 = none."),
        click.option("--config", "config", multiple=True, metavar="K=V",
                     help="Environment variable for the function (repeatable)."),
        click.option("--max-attempts", "max_attempts", type=int, help="Runs before giving up."),
        click.option("--retry-backoff", "retry_backoff_s", type=float,
                     help="First retry delay in seconds (doubles each time)."),
        click.option("--max-age", "max_age_s", type=int,
                     help="Seconds after which a call not yet started is dropped."),
    ]  # fmt: skip

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


_NUMERIC = ("memory_mb", "cpus_mcpu", "timeout_s", "idle_timeout_s", "tmpfs_mb",
            "max_attempts", "retry_backoff_s", "max_age_s")  # fmt: skip


@click.group("fn")
def fn_group() -> None:
    """Register, change, list and remove functions."""


@fn_group.command("create")
@click.argument("app")
@click.argument("name")
@_fn_options(required_image=True)
@json_option
@click.pass_context
@friendly_errors
def fn_create(ctx: click.Context, /, app: str, name: str, as_json: bool, **opts: Any) -> None:
    """Register function NAME of APP."""
    values = {k: opts[k] for k in _NUMERIC if opts[k] is not None}
    fn = Function(app=app, name=name, image=opts["image"], config=parse_config(opts["config"]),
                  **values)  # fmt: skip
    created = with_store(settings_from(ctx), lambda s: s.create_fn(fn))
    _show_fn(created, as_json, f"created {created.ref}")


@fn_group.command("update")
@click.argument("app")
@click.argument("name")
@_fn_options(required_image=False)
@click.option("--unset", "unset", multiple=True, metavar="K", help="Remove a config variable.")
@json_option
@click.pass_context
@friendly_errors
def fn_update(ctx: click.Context, /, app: str, name: str, as_json: bool, **opts: Any) -> None:
    """Change function NAME of APP; --config entries are merged into its config."""
    changes: dict[str, Any] = {k: opts[k] for k in _NUMERIC if opts[k] is not None}
    if opts["image"] is not None:
        changes["image"] = opts["image"]

    async def update(store: Datastore) -> Function:
        if opts["config"] or opts["unset"]:
            current = await store.get_fn(app, name)
            if current is None:
                raise FunctionNotFound(app, name)
            config = {**current.config, **parse_config(opts["config"])}
            for key in opts["unset"]:
                config.pop(key, None)
            changes["config"] = config
        return await store.update_fn(app, name, **changes)

    updated = with_store(settings_from(ctx), update)
    _show_fn(updated, as_json, f"updated {updated.ref}")


@fn_group.command("list")
@click.argument("app", required=False)
@json_option
@click.pass_context
@friendly_errors
def fn_list(ctx: click.Context, app: str | None, as_json: bool) -> None:
    """List functions, of one APP or of all."""
    fns = with_store(settings_from(ctx), lambda s: s.list_fns(app))
    if as_json:
        print_json([fn_to_json(fn) for fn in fns])
        return
    rows = [(fn.app, fn.name, fn.image, fn.memory_mb, fn.timeout_s, fn.idle_timeout_s)
            for fn in fns]  # fmt: skip
    print_table(["APP", "NAME", "IMAGE", "MEMORY_MB", "TIMEOUT_S", "IDLE_TIMEOUT_S"], rows)


@fn_group.command("show")
@click.argument("app")
@click.argument("name")
@json_option
@click.pass_context
@friendly_errors
def fn_show(ctx: click.Context, app: str, name: str, as_json: bool) -> None:
    """Show function NAME of APP."""
    fn = with_store(settings_from(ctx), lambda s: s.get_fn(app, name))
    if fn is None:
        raise FunctionNotFound(app, name)
    _show_fn(fn, as_json, None)


@fn_group.command("delete")
@click.argument("app")
@click.argument("name")
@click.pass_context
@friendly_errors
def fn_delete(ctx: click.Context, app: str, name: str) -> None:
    """Remove function NAME of APP (its call records stay)."""
    if not with_store(settings_from(ctx), lambda s: s.delete_fn(app, name)):
        raise FunctionNotFound(app, name)
    click.echo(f"deleted {app}/{name}")


def _show_fn(fn: Function, as_json: bool, headline: str | None) -> None:
    doc = fn_to_json(fn)
    if as_json:
        print_json(doc)
        return
    if headline:
        click.echo(headline)
    doc["config"] = " ".join(f"{k}={v}" for k, v in sorted(fn.config.items()))
    print_table(["FIELD", "VALUE"], list(doc.items()))


# ---------------------------------------------------------------- calls ...


@click.group("calls")
def calls_group() -> None:
    """Inspect, cancel, retry and purge call records."""


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_since(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


@calls_group.command("list")
@click.option("--app")
@click.option("--fn")
@click.option("--status", type=click.Choice([s.value for s in CallStatus]))
@click.option("--since", help="Created within a duration (10m, 2h, 1d) or after an ISO time.")
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
                   since=_since(since), limit=limit, cursor=cursor)  # fmt: skip
    page = with_store(settings_from(ctx), lambda s: s.list_calls(f))
    if as_json:
        print_json({"items": [r.to_json() for r in page.items], "next_cursor": page.next_cursor})
        return
    rows = [(r.id, f"{r.app}/{r.fn}", r.status.value, r.attempts, _short_time(r.created_at),
             _duration(r), _one_line(r.error)) for r in page.items]  # fmt: skip
    print_table(["ID", "FUNCTION", "STATUS", "ATTEMPTS", "CREATED", "RAN", "ERROR"], rows)
    if page.next_cursor:
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
    rec = with_store(settings_from(ctx), lambda s: s.get_call(call_id))
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


@calls_group.command("cancel")
@click.argument("call_ids", metavar="ID...", nargs=-1, required=True)
@click.pass_context
@friendly_errors
def calls_cancel(ctx: click.Context, call_ids: tuple[str, ...]) -> None:
    """Cancel queued calls, or ask running ones to stop; one line per id."""

    async def cancel(store: Datastore) -> int:
        unknown = 0
        for call_id in call_ids:
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

    if with_store(settings_from(ctx), cancel):
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

    if with_store(settings, retry):
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
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    count = with_store(settings_from(ctx), lambda s: s.purge_calls(age))
    cutoff = _short_time(utcnow() - age)
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

    rec, data = with_store(settings_from(ctx), fetch)
    if data is None:
        if rec is None:
            raise no_call(call_id)
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
