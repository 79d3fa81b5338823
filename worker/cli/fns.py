"""``fnq fn ...``: register, change, list and remove functions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import click

from config.domain import Function
from datastore.base import Datastore
from datastore.errors import FunctionNotFound, InvalidFunction
from datastore.validate import parse_config, validate_function
from worker.cli._common import (
    friendly_errors,
    iso_time,
    json_option,
    print_json,
    print_table,
    settings_from,
)
from worker.cli.store import with_store


def fn_to_json(fn: Function) -> dict[str, Any]:
    return {
        "app": fn.app, "name": fn.name, "image": fn.image, "memory_mb": fn.memory_mb,
        "cpus_mcpu": fn.cpus_mcpu, "timeout_s": fn.timeout_s,
        "idle_timeout_s": fn.idle_timeout_s, "tmpfs_mb": fn.tmpfs_mb,
        "config": dict(fn.config), "max_attempts": fn.max_attempts,
        "retry_backoff_s": fn.retry_backoff_s, "max_age_s": fn.max_age_s,
        "created_at": iso_time(fn.created_at), "updated_at": iso_time(fn.updated_at),
    }  # fmt: skip


def _config(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_config(pairs)
    except InvalidFunction as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@contextlib.contextmanager
def _refused_as_usage() -> Iterator[None]:
    """A definition the registry refuses (a limit out of range, a bad name or image)
    is a usage error: exit status 2."""
    try:
        yield
    except InvalidFunction as exc:
        raise click.UsageError(str(exc)) from None


def _fn_options(creating: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of ``fn create`` (``creating``: the image required, the defaults shown)
    and of ``fn update`` (no defaults: what is not given stays as it is)."""
    fields = Function.__dataclass_fields__

    def number(flag: str, name: str, kind: type, help_: str) -> Callable[..., Any]:
        default = fields[name].default if creating else None
        return click.option(flag, name, type=kind, default=default, show_default=creating,
                            help=help_)  # fmt: skip

    options = [
        click.option("--image", required=creating, help="Docker image, e.g. team/fn:1.0."),
        number("--memory", "memory_mb", int, "Memory in MB (6..8192)."),
        number("--cpus", "cpus_mcpu", int, "CPU quota in milli-CPUs; 0 = none."),
        number("--timeout", "timeout_s", int, "Longest run in seconds (1..3600)."),
        number("--idle-timeout", "idle_timeout_s", int,
               "Seconds a hot container waits idle for its next call (1..3600)."),
        number("--tmpfs", "tmpfs_mb", int, "Size of /tmp (a tmpfs) in MB; 0 = docker's default."),
        click.option("--config", "config", multiple=True, metavar="K=V", callback=_config,
                     help="Environment variable for the function (repeatable)."),
        number("--max-attempts", "max_attempts", int, "Runs before giving up."),
        number("--retry-backoff", "retry_backoff_s", float,
               "First retry delay in seconds (doubles each time)."),
        number("--max-age", "max_age_s", int,
               "Seconds after which a call not yet started is dropped."),
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
@_fn_options(creating=True)
@json_option
@click.pass_context
@friendly_errors
def fn_create(ctx: click.Context, /, app: str, name: str, as_json: bool, **opts: Any) -> None:
    """Register function NAME of APP."""
    values = {k: opts[k] for k in _NUMERIC if opts[k] is not None}
    fn = Function(app=app, name=name, image=opts["image"], config=opts["config"], **values)
    with _refused_as_usage():
        validate_function(fn)  # before the datastore is opened (or made)
        created = with_store(settings_from(ctx), lambda s: s.create_fn(fn))
    _show_fn(created, as_json, f"created {created.ref}")


@fn_group.command("update")
@click.argument("app")
@click.argument("name")
@_fn_options(creating=False)
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
            config = {**current.config, **opts["config"]}
            for key in opts["unset"]:
                config.pop(key, None)
            changes["config"] = config
        return await store.update_fn(app, name, **changes)

    with _refused_as_usage():
        updated = with_store(settings_from(ctx), update, create=False)
    _show_fn(updated, as_json, f"updated {updated.ref}")


@fn_group.command("list")
@click.argument("app", required=False)
@json_option
@click.pass_context
@friendly_errors
def fn_list(ctx: click.Context, app: str | None, as_json: bool) -> None:
    """List functions, of one APP or of all."""
    fns = with_store(settings_from(ctx), lambda s: s.list_fns(app), create=False)
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
    fn = with_store(settings_from(ctx), lambda s: s.get_fn(app, name), create=False)
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
    if not with_store(settings_from(ctx), lambda s: s.delete_fn(app, name), create=False):
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
