"""``fnq call`` (queue a call) and ``fnq dead`` (inspect, requeue, purge dead letters)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import click

from config.domain import Call, CallStatus, frozen_map, new_call_id
from config.errors import FnqError
from config.settings import Settings
from datastore.base import Datastore, open_datastore
from datastore.errors import FunctionNotFound, LogNotDeleted, StoreUnavailable
from datastore.wait import Waited, wait_for_calls
from mq import wire
from mq.base import DeadLetter, MessageQueue, open_queue
from worker.cli._common import (
    WRITE_PATIENCE_S,
    bad_value,
    friendly_errors,
    iso_time,
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
REQUEUE_ROUND = 500  # dead letters listed, reopened and requeued at a time


def read_body(spec: str | None) -> bytes:
    """``--body`` as given: TEXT, ``@FILE``, or ``-`` for standard input."""
    if spec is None:
        return b""
    if spec == "-":
        return sys.stdin.buffer.read()
    if spec.startswith("@"):
        try:
            return Path(spec[1:]).read_bytes()
        except OSError as exc:
            message = f"cannot read {spec[1:]}: {exc.strerror}"
            raise bad_value("--body", message) from None
    return spec.encode("utf-8", "surrogateescape")  # the bytes given, UTF-8 or not


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise bad_value("--header", f"{item!r} is not NAME:VALUE")
        if name.strip() in headers:  # the first value would be dropped without a word
            raise bad_value("--header", f"{name.strip()!r} is given more than once")
        headers[name.strip()] = value.strip()
    return headers


def build_call(
    app: str,
    fn: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    delay_s: float = 0.0,
    priority: int = 0,
    call_id: str | None = None,
    max_body_bytes: int | None = None,
) -> Call:
    """The Call that ``fnq call`` queues, checked against the wire format (WireError if bad)."""
    call = Call(
        id=new_call_id() if call_id is None else call_id,  # `--id ""` is refused
        app=app,
        fn=fn,
        body=body,
        headers=frozen_map(headers),
        priority=priority,
        delay_s=delay_s,
    )
    limit = len(body) if max_body_bytes is None else max_body_bytes
    wire.check_call(call, priority, delay_s, limit)
    return call


async def _with_queue(
    settings: Settings, work: Callable[[MessageQueue], Awaitable[T]], *, create: bool = True
) -> T:
    """``work`` on the queue; ``create=False`` as ``with_store`` takes it."""
    queue = open_queue(settings.mq_url, settings, create=create)
    try:
        return await work(queue)
    finally:
        await queue.close()


class Unrecorded(NamedTuple):
    """The call is queued, but its `queued` record could not be written."""

    reason: StoreUnavailable


async def enqueue_recorded(settings: Settings, call: Call) -> bool | Unrecorded:
    """Check the function exists, queue the call, and give it a `queued` record.

    Returns False, writing nothing, when a message with the call's id was already
    queued (by another producer, maybe with another request): the record is that
    message's to write, by whoever pushed it or by the worker that runs it.
    Unrecorded when the call is queued but the datastore could not be written
    (down, its disk full) for WRITE_PATIENCE_S: the worker that takes the call
    writes its record then, as for a call queued with redis-cli.

    The record is written after the push: a worker that is quicker records
    `running` first, and the late `queued` insert then leaves it alone.
    """
    store = await open_datastore(settings, write_patience_s=WRITE_PATIENCE_S)
    try:
        # Made now by the datastore's clock, which the workers judge its age by.
        call = dataclasses.replace(call, created_at=store.clock.now())
        fn = await store.get_fn(call.app, call.fn)
        if fn is None:
            raise FunctionNotFound(call.app, call.fn)
        known = await store.get_call(call.id)
        if known is not None and known.is_final:  # a worker would settle it, not run it
            raise FnqError(  # an error of state, not of usage: exit 1
                f"call {call.id} has already ended ({known.status}); "
                f"`fnq calls retry {call.id}` runs it again"
            )

        async def push(queue: MessageQueue) -> bool:
            return await queue.push_new(call)

        if not await _with_queue(settings, push):
            return False
        try:
            await store.record_queued(call, image=fn.image)
        except StoreUnavailable as exc:
            return Unrecorded(exc)
        return True
    finally:
        await store.close()


@click.command("call")
@click.argument("app")
@click.argument("fn")
@click.option("--body", default=None, help="Request body: TEXT, @FILE, or - for stdin.")
@click.option(
    "--header", "headers", multiple=True, metavar="NAME:VALUE", help="Repeatable, once per name."
)
@click.option("--delay", "delay_s", type=float, default=0.0, help="Seconds before it may run.")
@click.option("--priority", type=click.IntRange(0, 2), default=0, help="0-2, higher first.")
@click.option(
    "--id",
    "call_id",
    default=None,
    help="Call id (idempotent while queued: a call already queued with it stays as it is).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the call to end and print its response body instead of the id.",
)
@wait_timeout_option("--wait-timeout", "With --wait: seconds to wait at most; 0 = no limit.")
@click.pass_context
@friendly_errors
def call_cmd(
    ctx: click.Context,
    *,
    app: str,
    fn: str,
    body: str | None,
    headers: tuple[str, ...],
    delay_s: float,
    priority: int,
    call_id: str | None,
    wait: bool,
    wait_timeout_s: float,
) -> None:
    """Queue an asynchronous call of APP's function FN; prints the call id.

    With --wait: prints the response body once the call has succeeded (exit
    status 0); a call that ended otherwise exits 1, one not ended by the
    timeout 124, each with a line on stderr."""
    settings = settings_from(ctx)
    try:
        call = build_call(
            app,
            fn,
            body=read_body(body),
            headers=parse_headers(headers),
            delay_s=delay_s,
            priority=priority,
            call_id=call_id,
            max_body_bytes=settings.max_request_size,
        )
    except wire.WireError as exc:
        raise click.UsageError(str(exc)) from None

    queued = run_async(enqueue_recorded(settings, call))
    if not wait:
        click.echo(call.id)
    if isinstance(queued, Unrecorded):
        click.echo(f"fnq: call {call.id} is queued, but its record could not be written "
                   f"({queued.reason}); the worker that takes it writes it", err=True)  # fmt: skip
    elif not queued:
        click.echo(f"fnq: call {call.id} was already queued; this request was not queued", err=True)
    if wait:
        ctx.exit(_wait_for_answer(settings, call.id, wait_timeout_s or None))


def _wait_for_answer(settings: Settings, call_id: str, timeout_s: float | None) -> int:
    """``fnq call --wait``: the response body on stdout, or why there is none on stderr."""

    async def wait() -> Waited:
        store = await open_datastore(settings)
        try:
            return await wait_for_calls(store, [call_id], timeout_s)
        finally:
            await store.close()

    waited = run_async(wait())
    rec = waited.records.get(call_id)
    if rec is None or not rec.is_final:
        now = "no record yet" if rec is None else rec.status.value
        click.echo(f"fnq: call {call_id} has not ended after {timeout_s or 0:g} s ({now}); "
                   f"`fnq calls wait {call_id}` waits again", err=True)  # fmt: skip
    elif rec.status is CallStatus.SUCCESS:
        sys.stdout.buffer.write(rec.response_body)
        sys.stdout.buffer.flush()
    else:
        ran = f"; `fnq logs {call_id}` shows its output" if rec.attempts else " (it never ran)"
        click.echo(f"fnq: call {call_id} ended {rec.status.value}: {rec.error or 'no reason given'}"
                   f"{ran}", err=True)  # fmt: skip
    return wait_status(waited)


@click.group("dead")
def dead_group() -> None:
    """Messages that will not be delivered again: list, requeue or purge them."""


def _dead_row(d: DeadLetter) -> dict[str, object]:
    row: dict[str, object] = {
        "id": d.id,
        "reason": d.reason,
        "deliveries": d.deliveries,
        "died_at": iso_time(d.died_at),
        "raw": d.raw.decode("utf-8", "replace"),
    }
    if d.call is not None:
        row.update(app=d.call.app, fn=d.call.fn, priority=d.call.priority)
    return row


def _function_of(row: dict[str, object]) -> str:
    """APP/FN of a dead letter; of a malformed one, as far as its raw message names them."""
    if "app" in row:
        return f"{row['app']}/{row['fn']}"
    try:
        raw = json.loads(str(row["raw"]))
    except ValueError:
        raw = None
    named = raw if isinstance(raw, dict) else {}
    app, fn = named.get("app"), named.get("fn")
    return f"{app if isinstance(app, str) else '?'}/{fn if isinstance(fn, str) else '?'}"


@dead_group.command("list")
@json_option
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@click.pass_context
@friendly_errors
def dead_list(ctx: click.Context, as_json: bool, limit: int) -> None:
    """Dead letters, oldest first.

    DELIVERIES counts the deliveries of the message whose reservation lapsed,
    plus the last one; a retry after the function failed starts no new count.
    ATTEMPTS is how often the call ran, from its record (- without one).
    """
    settings = settings_from(ctx)

    async def fetch(queue: MessageQueue) -> list[DeadLetter]:
        return await queue.dead_list(limit)

    async def both() -> tuple[list[DeadLetter], dict[str, int]]:
        dead = await _with_queue(settings, fetch, create=False)
        return dead, await _attempts(settings, [d.id for d in dead])

    dead, attempts = run_async(both())
    rows = [{**_dead_row(d), "attempts": attempts.get(d.id)} for d in dead]
    if as_json:
        print_json(rows)
        return
    table = [
        (
            r["id"],
            _function_of(r),
            r["deliveries"],
            "-" if r["attempts"] is None else r["attempts"],
            short_time(d.died_at),
            r["reason"],
        )
        for r, d in zip(rows, dead, strict=True)
    ]
    print_table(["ID", "FUNCTION", "DELIVERIES", "ATTEMPTS", "DIED AT", "REASON"], table)


async def _attempts(settings: Settings, call_ids: list[str]) -> dict[str, int]:
    """The attempts of those calls that have a record. The list does without them
    when the datastore cannot be read (it says so on stderr); it never makes one."""
    if not call_ids:
        return {}
    try:
        store = await open_datastore(settings, create=False)
        try:
            records = await store.get_calls(call_ids)
        finally:
            await store.close()
    except FnqError as exc:
        click.echo(f"fnq: no attempts shown: {exc}", err=True)
        return {}
    return {call_id: rec.attempts for call_id, rec in records.items()}


def _selection(ids: tuple[str, ...], all_: bool) -> list[str] | None:
    if bool(ids) == all_:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    return None if all_ else list(ids)


@dead_group.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@click.pass_context
@friendly_errors
def dead_requeue(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> None:
    """Queue dead letters again to run as new calls; prints how many.

    Each gets fresh delivery counts and age, and a call that has a final record
    (an error, say) gets it back to `queued`, attempts 0, so that it runs again.
    """
    chosen = _selection(ids, all_)
    done, stuck = run_async(requeue_dead(settings_from(ctx), chosen))
    _report(ctx, done, chosen, len(stuck))


def _report(ctx: click.Context, done: int, chosen: list[str] | None, stuck: int = 0) -> None:
    """Print how many dead letters were handled; ids that named none, and ``stuck``
    dead letters (said why on stderr already), fail the command."""
    click.echo(done)
    if chosen is not None and done + stuck < len(set(chosen)):
        missing = len(set(chosen)) - done - stuck
        click.echo(f"fnq: {missing} of the ids given named no dead letter", err=True)
        ctx.exit(1)
    if stuck:
        ctx.exit(1)


async def requeue_dead(settings: Settings, ids: Sequence[str] | None) -> tuple[int, list[str]]:
    """Requeue the dead letters ``ids`` (None: all), their final records reopened first
    (a record reopened after the push could meet a worker that settles the call as
    already ended): how many, and the ids of those that stay dead because their
    call's old log could not be deleted (each said on stderr). Idempotent: running
    it again after a failure finishes the job."""
    queue = open_queue(settings.mq_url, settings, create=False)  # the dead letters are in it
    try:
        store = await open_datastore(settings, create=False, write_patience_s=WRITE_PATIENCE_S)
    except BaseException:
        await queue.close()
        raise
    try:
        if ids is not None:
            return await _requeue_some(queue, store, ids)
        # In rounds, each the oldest dead letters; at most as many as there were at
        # first (a requeued message that dies again is not taken twice). Those that
        # stay dead are the oldest of the next rounds' lists, and passed over.
        total, stuck, left = 0, list[str](), (await queue.stats()).dead
        while left > 0:
            listed = await queue.dead_list(min(left, REQUEUE_ROUND) + len(stuck))
            passed = set(stuck)
            batch = [d.id for d in listed if d.id not in passed]
            if not batch:
                break
            done, failed = await _requeue_some(queue, store, batch)
            total, stuck = total + done, stuck + failed
            left -= len(batch)
        return total, stuck
    finally:
        await queue.close()
        await store.close()


async def _requeue_some(
    queue: MessageQueue, store: Datastore, ids: Sequence[str]
) -> tuple[int, list[str]]:
    """Requeue the dead letters of ``ids``: how many, and the ids left dead because
    their call's old log could not be deleted (its record stays final)."""
    # Only the records of dead letters: an id that names none (mistyped, requeued
    # already, purged) keeps its record as it is, not `queued` with nothing queued.
    among = await queue.dead_among(ids)
    stuck: list[str] = []

    async def reopen(call_id: str) -> None:
        try:
            await store.reopen_call(call_id)  # no record, or not final: nothing
        except LogNotDeleted as exc:  # that call alone stays as it was
            click.echo(f"fnq: dead letter {call_id} not requeued: {exc}", err=True)
            stuck.append(call_id)

    try:
        async with asyncio.TaskGroup() as reopening:  # together: their writes share commits
            for call_id in among:
                reopening.create_task(reopen(call_id))
    except* FnqError as failed:  # the others are cancelled; the first says why
        raise failed.exceptions[0] from None
    left_dead = set(stuck)
    return await queue.dead_requeue([i for i in ids if i not in left_dead]), stuck


@dead_group.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@click.pass_context
@friendly_errors
def dead_purge(ctx: click.Context, ids: tuple[str, ...], all_: bool) -> None:
    """Delete dead letters for good; prints how many."""
    chosen = _selection(ids, all_)

    async def purge(queue: MessageQueue) -> int:
        return await queue.dead_purge(chosen)

    _report(ctx, run_async(_with_queue(settings_from(ctx), purge, create=False)), chosen)
