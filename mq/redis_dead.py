"""The Redis queue's dead letters (mq.redis): listed, queued again, purged.

A dead letter is an entry of ``P:dead``: the message's fields plus ``_key``,
``_reason``, ``_deliveries`` and ``_died``, put there by the scripts (``bury``
in common.lua) and found by key through ``P:dead:ids``. requeue.lua moves dead
letters back to ``P:calls``, to be routed afresh; purge.lua deletes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from config.domain import Call
from mq import wire
from mq.base import DeadLetter
from mq.redis_link import RedisLink

REQUEUE_BATCH = 500


def dead_key(fields: dict[bytes, bytes], fallback: str) -> str:
    """The dead-letter key of a malformed entry: its own id when that is 1-128 characters
    of UTF-8 text (whatever else is wrong with it), else ``fallback``. The id may be the
    very field that made it malformed, so it must not be decoded strictly."""
    try:
        given = fields.get(b"id", b"").decode()
    except UnicodeDecodeError:
        return fallback
    return given if 0 < len(given) <= 128 else fallback


async def dead_list(link: RedisLink, limit: int, max_body: int) -> list[DeadLetter]:
    entries = await link.cmd(link.client.xrange, link.keys[7], "-", "+", limit)
    return [dead_letter(fields, max_body) for _, fields in entries]


def dead_letter(fields: dict[bytes, bytes], max_body: int) -> DeadLetter:
    key = fields.get(b"_key", b"?").decode()
    original = {k: v for k, v in fields.items() if not k.startswith(b"_")}
    try:
        call: Call | None = wire.decode_fields(original, max_body, default_id=key).call
    except wire.WireError:
        call = None
    raw = json.dumps(
        {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in original.items()},
        ensure_ascii=False,
    ).encode()
    return DeadLetter(
        id=key,
        reason=fields.get(b"_reason", b"").decode(),
        deliveries=int(fields.get(b"_deliveries", b"0")),
        died_at=wire.from_ms(int(fields.get(b"_died", b"0"))),
        raw=raw,
        call=call,
    )


async def among(link: RedisLink, ids: Sequence[str]) -> list[str]:
    if not ids:
        return []
    found = await link.cmd(link.client.hmget, link.keys[8], list(ids))  # P:dead:ids
    return [i for i, where in zip(ids, found, strict=True) if where is not None]


async def requeue(link: RedisLink, ids: Sequence[str] | None) -> int:
    if ids is not None:
        return int(await link.eval("requeue", ["ids", 0, *ids])) if ids else 0
    total = 0
    while True:
        moved = int(await link.eval("requeue", ["all", REQUEUE_BATCH]))
        total += moved
        if moved < REQUEUE_BATCH:
            return total


async def purge(link: RedisLink, ids: Sequence[str] | None) -> int:
    if ids is None:
        return int(await link.eval("purge", ["all"]))
    return int(await link.eval("purge", ["ids", *ids])) if ids else 0
