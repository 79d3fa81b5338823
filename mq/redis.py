"""The Redis queue (``redis://HOST:PORT/DB?prefix=fnq``, ``rediss://`` for TLS,
``unix:///SOCKET?db=DB&prefix=fnq`` for a server on this host).

Keys, with prefix ``P`` (default ``fnq``)::

    P:calls            stream  producers XADD here (wire format in mq.wire)
    P:ready:0|1|2      streams ready messages by priority, consumer group "fnq"
    P:later            stream  delayed messages ...
    P:later:due        zset    ... by due time (ms)
    P:ids              hash    call id -> where it is queued (one message per id)
    P:dead, P:dead:ids stream + hash: dead letters by key
    P:meta             hash    when lapsed reservations are next swept, sweep cursors,
                               the id of the wake-up entry in P:calls (enqueue.lua)

A reservation is an entry in a ready stream's pending list (XREADGROUP); it
lapses when the entry has been idle longer than the reservation time, and the
next sweep (XAUTOCLAIM, at most every ``reclaim_every_ms``) hands it to the
sweeping consumer with its delivery count raised. ``extend`` resets the idle
time (XCLAIM JUSTID). ``release`` and delayed retries move the entry to the end
of its stream or to ``P:later``, carrying the deliveries made so far in ``_n``.

Entries producers XADD to ``P:calls`` are read by consumers too: each is
validated in Python, then routed atomically (a Lua script): a duplicate id is
dropped, a delayed one goes to ``P:later``, the rest to its ready stream; a
malformed one goes to the dead letters with the reason. The routing consumer
takes up to the count it reserves for in the same script (new ready entries,
by priority), so a reserve that read producers' entries needs no second one.

Every multi-step change is one Lua script (mq/lua/*.lua, each prefixed with
common.lua), so a consumer that dies mid-way leaves nothing half done. The
scripts and the blocking read go over lean connections (mq.resp): packed
once, parsed by hiredis, a few microseconds of Python per round trip. The
rest (making the groups, loading the scripts, listing dead letters) goes
through redis-py. These round trips are mq.redis_link's; mq.redis_dead lists,
requeues and purges the dead letters; mq.redis_url reads the URL.

Waiting: when a reserve finds nothing it blocks in XREADGROUP on the four
streams (new entries only, handed to it in the same round trip), at most
until the next delayed message is due or, while reservations are held, the
next sweep. Until then (at most ``QUIET_MAX_S``) nothing but new entries can
turn up, so the consumer's next reserves go straight to that blocking read,
with the finished messages' acks in the same round trip; the reserve script
runs again once the time is up or a read comes back empty. When calls arrive
one at a time, that is one light command per call instead of a script that
also looks for due and lapsed entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from config.domain import Call, new_call_id
from config.settings import Settings
from mq import redis_dead, wire
from mq.base import (
    LAPSED_REASON,
    Burials,
    Buried,
    DeadLetter,
    Message,
    QueueStats,
    claim_shielded,
)
from mq.errors import InvalidCall, QueueError, ReservationLost
from mq.redis_link import RedisLink
from mq.redis_url import open_client
from mq.resp import bulks

GROUP = "fnq"
OP_TIMEOUT_S = 10.0
PROMOTE_LIMIT = 200
QUIET_MAX_S = 0.25  # the longest run of reserves without the reserve script
PUSH_BATCH = 500
LEAVE_TIMEOUT_S = 2.0  # leaving the consumer group at close, at most


def reclaim_every_ms(reservation_ms: int) -> int:
    """How often lapsed reservations are swept: a quarter reservation, 100 ms to 1 s."""
    return max(100, min(1000, reservation_ms // 4))


WAKE = b"_wake"  # the field of an inbox entry that only wakes consumers (enqueue.lua)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _batch(entries: list[list[Any]]) -> list[Any]:
    """enqueue.lua's arguments for ``entries`` (each as ``_route_args`` makes it)."""
    args: list[Any] = [GROUP, len(entries)]
    for entry in entries:
        args += entry
    return args


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


class RedisQueue:
    """MessageQueue on Redis streams (Redis >= 6.2)."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        *,
        prefix: str = wire.DEFAULT_PREFIX,
        op_timeout_s: float = OP_TIMEOUT_S,
        owns_client: bool = True,
    ) -> None:
        self._client = client
        self._owns_client = owns_client
        self._prefix = prefix
        self._op_timeout_s = op_timeout_s
        self._reservation_ms = settings.mq_reservation_msecs
        self._max_deliveries = settings.mq_max_deliveries
        self._max_body = settings.max_request_size
        self._consumer = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        p = prefix
        self.inbox_key = f"{p}:{wire.INBOX}"
        self._ready_keys = [f"{p}:ready:{i}" for i in range(wire.MAX_PRIORITY + 1)]
        keys = [
            *self._ready_keys,
            self.inbox_key,
            f"{p}:later",
            f"{p}:later:due",
            f"{p}:ids",
            f"{p}:dead",
            f"{p}:dead:ids",
            f"{p}:meta",
        ]
        group_keys = [*self._ready_keys, self.inbox_key]
        self._link = RedisLink(client, keys, op_timeout_s, group=GROUP, group_keys=group_keys)
        self._buried = Burials()
        self._quiet_until = 0.0  # loop time until which no sweep or delayed entry is due
        read = [self._ready_keys[2], self._ready_keys[1], self._ready_keys[0], self.inbox_key]
        self._read_head = bulks("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT")
        self._read_tail = bulks("STREAMS", *read, *(">" for _ in read))
        self._read_keys = len(read)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisQueue:
        client, prefix, timeout_s = open_client(url, OP_TIMEOUT_S)
        return cls(client, settings, prefix=prefix, op_timeout_s=timeout_s)

    @property
    def consumer(self) -> str:
        return self._consumer

    # ------------------------------------------------------------- produce
    async def push(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> str:
        await self.push_new(call, delay_s=delay_s, priority=priority)
        return call.id

    async def push_new(
        self, call: Call, *, delay_s: float | None = None, priority: int | None = None
    ) -> bool:
        prio = call.priority if priority is None else priority
        delay = call.delay_s if delay_s is None else delay_s
        [queued] = await self._enqueue([self._entry(call, prio, delay)])
        return queued

    async def push_many(self, calls: Sequence[Call]) -> list[str]:
        entries = [self._entry(c, c.priority, c.delay_s) for c in calls]
        for start in range(0, len(entries), PUSH_BATCH):
            await self._enqueue(entries[start : start + PUSH_BATCH])
        return [c.id for c in calls]

    def _entry(self, call: Call, prio: int, delay_s: float, src: str = "") -> list[Any]:
        try:
            wire.check_call(call, prio, delay_s, self._max_body)
        except wire.WireError as exc:
            raise InvalidCall(f"call {call.id}: {exc}") from None
        return self._route_args(call, prio, delay_s, src)

    @staticmethod
    def _route_args(call: Call, prio: int, delay_s: float, src: str) -> list[Any]:
        fields = wire.call_fields(call, prio)
        flat: list[Any] = [call.id, int(delay_s * 1000), src, 2 * len(fields)]
        for name, value in fields.items():
            flat += (name, value)
        return flat

    async def _enqueue(self, entries: list[list[Any]]) -> list[bool]:
        """enqueue.lua: per entry, whether it queued a message (False: its id was there)."""
        if not entries:
            return []
        return [bool(queued) for queued in await self._link.eval("enqueue", _batch(entries))]

    # ------------------------------------------------------------- consume
    async def reserve(self, timeout_s: float) -> Message | None:
        msgs = await self.reserve_many(1, timeout_s)
        return msgs[0] if msgs else None

    async def reserve_many(
        self,
        max_count: int,
        timeout_s: float,
        *,
        ack: Sequence[Message] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        acks = self._ack_args(ack)  # the first round trip acks them
        made = self._buried.made
        if loop.time() < self._quiet_until:
            msgs = await self._reserve_quietly(max_count, deadline, acks, on_acked)
            if msgs:
                return msgs
            acks = []
            if loop.time() >= deadline:
                return []
        while True:
            box: list[Any] = []
            msgs = await claim_shielded(
                self._claim(max_count, box, acks), self._hand_back, self._op_timeout_s
            )
            if acks and on_acked is not None:
                on_acked()
            acks = []
            if msgs:
                return msgs
            remaining = deadline - loop.time()
            cap_ms = box[0] if box else None  # the longest useful wait, -1: no limit
            if cap_ms is not None:
                self._quiet_for(cap_ms)
            # No wait past the deadline, nor once a call was buried (it is told at once).
            if remaining <= 0 or (cap_ms is not None and self._buried.made != made):
                return []
            if cap_ms is None:  # routed or buried something: look again at once
                continue
            block_ms = remaining * 1000 if cap_ms < 0 else min(remaining * 1000, cap_ms)
            msgs = await self._block(max_count, max(1, int(block_ms)))
            if msgs:
                return msgs

    def _quiet_for(self, cap_ms: int) -> None:
        """Nothing but new entries can turn up for ``cap_ms`` (-1: no limit): until then
        (at most ``QUIET_MAX_S``) reserves go straight to the blocking read."""
        quiet_s = QUIET_MAX_S if cap_ms < 0 else min(QUIET_MAX_S, cap_ms / 1000)
        self._quiet_until = asyncio.get_running_loop().time() + quiet_s

    async def _reserve_quietly(
        self,
        count: int,
        deadline: float,
        acks: Sequence[Any],
        on_acked: Callable[[], None] | None,
    ) -> list[Message]:
        """While nothing but new entries can turn up: the blocking read alone."""
        wait_s = min(deadline, self._quiet_until) - asyncio.get_running_loop().time()
        try:
            msgs = await self._block(count, max(1, int(wait_s * 1000)), acks, on_acked)
        except BaseException:
            self._quiet_until = 0.0  # the next reserve runs the script (it mends NOGROUP)
            raise
        if not msgs:
            self._quiet_until = 0.0  # time is up, or nothing came: the script again
        return msgs

    async def _block(
        self,
        count: int,
        block_ms: int,
        acks: Sequence[Any] = (),
        on_acked: Callable[[], None] | None = None,
    ) -> list[Message]:
        """Wait for new entries and take them in the same round trip.

        The reserve script found nothing and said how long waiting is useful (the
        next delayed entry or sweep is due then). XREADGROUP BLOCK on every stream
        hands the first new entries straight to this consumer, as the script would
        have: they need no second round trip. Producers' entries are routed, and
        taken, by one more script; entries past ``count`` are handed back in place.
        ``acks`` (as for ack.lua) go first, in the same round trip (``on_acked`` when
        done). Cancelled once the read has answered, the step finishes and the
        messages go back at once (claim_shielded), not when their reservations lapse.
        """
        timeout_s = block_ms / 1000 + self._op_timeout_s
        read = b"".join((b"*%d\r\n" % (9 + 2 * self._read_keys), self._read_head,
                         bulks(count, "BLOCK", block_ms), self._read_tail))  # fmt: skip
        reply = await self._link.cmd(
            self._link.acked_read, read, acks, on_acked, timeout_s=timeout_s
        )
        msgs: list[Message] = []
        raw: list[Any] = []
        for key_b, entries in reply:
            key = _s(key_b)
            for eid_b, flat in entries:
                if key == self.inbox_key:
                    raw.append((eid_b, 1, flat))
                    continue
                prio = self._ready_keys.index(key)
                msg = await self._taken(prio, _s(eid_b), _pairs(flat))
                if msg is not None:
                    msgs.append(msg)
        if raw or len(msgs) > count:
            return await claim_shielded(
                self._after_read(msgs, raw, count), self._hand_back, self._op_timeout_s
            )
        return msgs

    async def _after_read(self, msgs: list[Message], raw: list[Any], count: int) -> list[Message]:
        """Of a blocking read: route the producers' entries (taking what room is left),
        and hand back in place what is past ``count``."""
        if raw:
            msgs += await self._route(raw, take=count - len(msgs))
        if len(msgs) > count:  # several streams had new entries: keep the first ones
            await self._hand_back_in_place(msgs[count:])
            msgs = msgs[:count]
        return msgs

    async def _taken(
        self, prio: int, eid: str, fields: dict[bytes, bytes], deliveries: int | None = None
    ) -> Message | None:
        """A ready entry this consumer was just given, as a Message (None: malformed and
        buried). ``deliveries`` defaults to a first delivery by this group."""
        if deliveries is None:
            prior = fields.get(b"_n", b"0")
            deliveries = (int(prior) if prior.isdigit() else 0) + 1
        try:
            parsed = wire.decode_fields(fields, self._max_body)
        except wire.WireError as exc:
            await self._bury_malformed(
                str(prio), eid, fields, f"q{prio}-{eid}",
                reason=f"malformed message: {exc}", deliveries=deliveries,
            )  # fmt: skip
            return None
        return Message(parsed.call, deliveries, f"{prio}|{eid}", prio)

    async def _claim(self, count: int, box: list[Any], acks: list[Any]) -> list[Message]:
        every = reclaim_every_ms(self._reservation_ms)
        args = [
            GROUP,
            self._consumer,
            count,
            self._reservation_ms,
            self._max_deliveries,
            every,
            PROMOTE_LIMIT,
            LAPSED_REASON,
            *acks,
        ]
        out, raw, wait, buried = await self._link.eval("reserve", args)
        for call_id, reason in buried:
            self._buried.add(_s(call_id), _s(reason))
        msgs: list[Message] = []
        for prio, eid_b, deliveries, flat in out:
            msg = await self._taken(int(prio), _s(eid_b), _pairs(flat), int(deliveries))
            if msg is not None:
                msgs.append(msg)
        if raw:
            msgs += await self._route(raw, take=count - len(msgs))
        if not msgs and not raw and wait:
            box.append(int(wait))
        return msgs

    async def _route(self, raw: list[Any], take: int = 0) -> list[Message]:
        """Validate producers' entries and route them (enqueue.lua); in the same round
        trip this consumer takes up to ``take`` new ready entries (the routed ones among
        them, after any older ones of their priority), so that a reserve that read them
        needs no second one to get them."""
        entries: list[list[Any]] = []
        for eid_b, times, flat in raw:
            eid = _s(eid_b)
            fields = _pairs(flat)
            if fields.keys() == {WAKE}:  # a delayed push woke us (enqueue.lua): drop it
                entries.append(["", 0, eid, 0])
                continue
            try:
                if 2 * len(fields) != len(flat):
                    wire.check_unique_names(flat[::2])
                parsed = wire.decode_fields(
                    fields,
                    self._max_body,
                    default_id=new_call_id(),
                    default_created_ms=int(eid.split("-")[0]),
                )
            except wire.WireError as exc:
                await self._bury_malformed(
                    "inbox", eid, fields, f"inbox-{eid}",
                    reason=f"malformed message: {exc}", deliveries=int(times),
                )  # fmt: skip
                continue
            entries.append(self._route_args(parsed.call, parsed.priority, parsed.delay_s, eid))
        if take < 1 or not entries:
            await self._enqueue(entries)
            return []
        _, taken = await self._link.eval("enqueue", [*_batch(entries), self._consumer, take])
        msgs: list[Message] = []
        for prio, eid_b, flat in taken:
            msg = await self._taken(int(prio), _s(eid_b), _pairs(flat))
            if msg is not None:
                msgs.append(msg)
        return msgs

    async def _bury(self, src: str, eid: str, key: str, reason: str, deliveries: int) -> None:
        await self._link.eval("bury", [GROUP, src, eid, key, reason, deliveries])

    async def _bury_malformed(
        self,
        src: str,
        eid: str,
        fields: dict[bytes, bytes],
        fallback: str,
        *,
        reason: str,
        deliveries: int,
    ) -> None:
        """``_bury`` an entry this consumer cannot take. Reported by ``take_buried`` when
        it carries a valid call id and was routed (one message per id: a record of that
        id is this message's). A producer's entry not yet routed is not: its id may be
        that of a live call with another message, whose record is not its own."""
        key = redis_dead.dead_key(fields, fallback)
        await self._bury(src, eid, key, reason, deliveries)
        if src != "inbox" and fields.get(b"id") == key.encode():
            self._buried.add(key, reason)

    def take_buried(self) -> list[Buried]:
        return self._buried.take()

    async def _hand_back(self, msgs: list[Message]) -> None:
        for msg in msgs:
            await self.release(msg)

    async def _hand_back_in_place(self, msgs: list[Message]) -> None:
        """Give back entries a blocking read took beyond ``count`` (handback.lua): the
        next reserve's sweep takes them first, so they keep their place in line."""
        args: list[Any] = [GROUP, self._reservation_ms + 1]
        for msg in msgs:
            args += self._where(msg)
        await self._link.eval("handback", args)
        self._quiet_until = 0.0  # the next reserve runs the script, which sweeps

    @staticmethod
    def _where(msg: Message) -> tuple[str, str]:
        prio, _, eid = msg.receipt.partition("|")
        return prio, eid

    async def ack(self, msg: Message) -> None:
        await self.ack_many([msg])

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        if msgs:
            await self._link.eval("ack", [GROUP, *self._ack_args(msgs)])

    def _ack_args(self, msgs: Sequence[Message]) -> list[Any]:
        args: list[Any] = []
        for msg in msgs:
            args += (*self._where(msg), msg.call.id)
        return args

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        delay_ms = int(wire.check_delay(delay_s) * 1000)
        prio, eid = self._where(msg)
        prior = max(msg.deliveries - 1, 0)
        await self._link.eval("release", [GROUP, self._consumer, prio, eid, delay_ms, prior])

    async def extend(self, msg: Message) -> None:
        prio, eid = self._where(msg)
        if not await self._link.eval("extend", [GROUP, self._consumer, prio, eid, msg.deliveries]):
            raise ReservationLost(f"message {msg.call.id}: reservation {msg.receipt} is gone")

    async def dead_letter(self, msg: Message, reason: str) -> None:
        prio, eid = self._where(msg)
        await self._bury(prio, eid, msg.call.id, reason, msg.deliveries)

    # --------------------------------------------------------- dead letters
    async def dead_list(self, limit: int = 100) -> list[DeadLetter]:
        return await redis_dead.dead_list(self._link, limit, self._max_body)

    async def dead_among(self, ids: Sequence[str]) -> list[str]:
        return await redis_dead.among(self._link, ids)

    async def dead_requeue(self, ids: Sequence[str] | None = None) -> int:
        return await redis_dead.requeue(self._link, ids)

    async def dead_purge(self, ids: Sequence[str] | None = None) -> int:
        return await redis_dead.purge(self._link, ids)

    async def stats(self) -> QueueStats:
        ready, delayed, reserved, dead = await self._link.eval("stats", [GROUP])
        return QueueStats(ready=ready, delayed=delayed, reserved=reserved, dead=dead)

    async def close(self) -> None:
        try:
            if self._link.groups_made:
                # Unreachable server: the consumer's name just stays registered (harmless),
                # so a stopping worker does not wait a whole time limit for it.
                with contextlib.suppress(QueueError):
                    await self._link.eval("leave", [GROUP, self._consumer], LEAVE_TIMEOUT_S)
        finally:
            self._link.lines.close()
            if self._owns_client:
                await self._client.aclose()
