"""Enqueue calls on a Redis queue from any Python program.

Needs only ``redis`` (and this package's standard-library-only ``mq.wire`` and
``config.domain``)::

    import redis
    from mq.producer import enqueue

    client = redis.Redis.from_url("redis://localhost:6379/0")
    call_id = enqueue(client, "demo", "echo", b"hello", headers={"Content-Type": "text/plain"})

Each call is one ``XADD <prefix>:calls * app .. fn .. body .. id ..`` (see
docs/queue.md): the message is safe in Redis when the function returns. Its
creation time is the entry's, by Redis's clock. The
workers validate it; a message they cannot use goes to the dead letters.
A call id is made here when none is given, so the caller can look it up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from config.domain import Call, frozen_map, new_call_id
from mq import wire

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["build_fields", "enqueue", "enqueue_async", "inbox_key"]

MAX_BODY_BYTES = 1_048_576  # the workers' default FN_MAX_REQUEST_SIZE


def inbox_key(prefix: str = wire.DEFAULT_PREFIX) -> str:
    """The stream producers add to."""
    return f"{prefix}:{wire.INBOX}"


def build_fields(
    app: str,
    fn: str,
    body: bytes | str = b"",
    *,
    headers: Mapping[str, str] | None = None,
    delay_s: float = 0.0,
    priority: int = 0,
    call_id: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> tuple[str, dict[str, bytes]]:
    """The call id and the stream fields of one call; ValueError if a worker would reject it."""
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    call = Call(
        id=call_id or new_call_id(),
        app=app,
        fn=fn,
        body=data,
        headers=frozen_map(headers),
        priority=priority,
        delay_s=delay_s,
    )
    wire.check_call(call, priority, delay_s, max_body_bytes)  # WireError is a ValueError
    # No `created`: the call was made when Redis adds the entry, by Redis's clock, which
    # every worker judges its age by alike (this host's may be off).
    return call.id, wire.call_fields(call, priority, delay_s=delay_s, created=False)


def enqueue(
    client: redis.Redis,
    app: str,
    fn: str,
    body: bytes | str = b"",
    *,
    headers: Mapping[str, str] | None = None,
    delay_s: float = 0.0,
    priority: int = 0,
    call_id: str | None = None,
    prefix: str = wire.DEFAULT_PREFIX,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> str:
    """Queue one call with a synchronous client; returns its id."""
    cid, fields = build_fields(
        app,
        fn,
        body,
        headers=headers,
        delay_s=delay_s,
        priority=priority,
        call_id=call_id,
        max_body_bytes=max_body_bytes,
    )
    client.xadd(inbox_key(prefix), fields)  # type: ignore[arg-type]
    return cid


async def enqueue_async(
    client: redis.asyncio.Redis,
    app: str,
    fn: str,
    body: bytes | str = b"",
    *,
    headers: Mapping[str, str] | None = None,
    delay_s: float = 0.0,
    priority: int = 0,
    call_id: str | None = None,
    prefix: str = wire.DEFAULT_PREFIX,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> str:
    """Queue one call with an asyncio client; returns its id.

    Bound the wait with the client's ``socket_timeout`` or an ``asyncio.timeout``.
    """
    cid, fields = build_fields(
        app,
        fn,
        body,
        headers=headers,
        delay_s=delay_s,
        priority=priority,
        call_id=call_id,
        max_body_bytes=max_body_bytes,
    )
    await client.xadd(inbox_key(prefix), fields)  # type: ignore[arg-type]
    return cid
