"""The Redis queue (``redis://HOST:PORT/DB?prefix=fnq``, ``rediss://`` for TLS).

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
malformed one goes to the dead letters with the reason.

Every multi-step change is one Lua script (mq/lua/*.lua, each prefixed with
common.lua), so a consumer that dies mid-way leaves nothing half done. The
scripts and the blocking read go over lean connections (mq.resp): packed
once, parsed by hiredis, a few microseconds of Python per round trip. The
rest (groups, statistics, dead letters) goes through redis-py.
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
import functools
import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.connection import SSLConnection
from redis.commands.core import AsyncScript

from config.domain import Call, new_call_id
from config.errors import ConfigError
from config.settings import Settings
from mq import wire
from mq.base import Burials, Buried, DeadLetter, Message, QueueStats, claim_shielded
from mq.errors import InvalidCall, QueueError, QueueUnavailable, ReservationLost
from mq.redis_url import TLS_URL_OPTIONS, url_options
from mq.resp import Lines, ReplyError, bulks

GROUP = "fnq"
OP_TIMEOUT_S = 10.0
PROMOTE_LIMIT = 200
QUIET_MAX_S = 0.25  # the longest run of reserves without the reserve script
REQUEUE_BATCH = 500
PUSH_BATCH = 500
_SCRIPTS = (
    "enqueue",
    "reserve",
    "ack",
    "release",
    "extend",
    "bury",
    "requeue",
    "purge",
    "leave",
    "stats",
)


@functools.cache
def _lua(name: str) -> str:
    folder = Path(__file__).with_name("lua")
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def reclaim_every_ms(reservation_ms: int) -> int:
    """How often lapsed reservations are swept: a quarter reservation, 100 ms to 1 s."""
    return max(100, min(1000, reservation_ms // 4))


WAKE = b"_wake"  # the field of an inbox entry that only wakes consumers (enqueue.lua)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dead_key(fields: dict[bytes, bytes], fallback: str) -> str:
    """The dead-letter key of a malformed entry: its own id when that is 1-128 characters
    of UTF-8 text (whatever else is wrong with it), else ``fallback``. The id may be the
    very field that made it malformed, so it must not be decoded strictly."""
    try:
        given = fields.get(b"id", b"").decode()
    except UnicodeDecodeError:
        return fallback
    return given if 0 < len(given) <= 128 else fallback


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
        self._keys = [
            *self._ready_keys,
            self.inbox_key,
            f"{p}:later",
            f"{p}:later:due",
            f"{p}:ids",
            f"{p}:dead",
            f"{p}:dead:ids",
            f"{p}:meta",
        ]
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_lua(name)) for name in _SCRIPTS
        }
        pool = client.connection_pool
        self._lines = Lines(
            pool.connection_kwargs,
            tls=issubclass(pool.connection_class, SSLConnection),
            connect_timeout_s=pool.connection_kwargs.get("socket_connect_timeout") or op_timeout_s,
        )
        # EVALSHA NAME's keys, encoded once: per call only the arguments are packed.
        self._heads = {
            name: bulks("EVALSHA", script.sha, len(self._keys), *self._keys)
            for name, script in self._scripts.items()
        }
        self._groups_made = False
        self._buried = Burials()
        self._quiet_until = 0.0  # loop time until which no sweep or delayed entry is due
        read = [self._ready_keys[2], self._ready_keys[1], self._ready_keys[0], self.inbox_key]
        self._read_head = bulks("XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT")
        self._read_tail = bulks("STREAMS", *read, *(">" for _ in read))
        self._read_keys = len(read)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> RedisQueue:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        accepted = url_options(parts.scheme.lower())
        unknown = sorted(set(query) - set(accepted))
        if unknown and set(unknown) <= set(TLS_URL_OPTIONS):
            raise ConfigError(f"queue URL: {unknown[0]!r} is a TLS option: use rediss://")
        if unknown:
            raise ConfigError(
                f"queue URL: unknown option {', '.join(map(repr, unknown))}"
                f" (accepted: {', '.join(accepted)})"
            )
        prefix = query.pop("prefix", wire.DEFAULT_PREFIX)
        try:
            timeout_s = float(query.pop("timeout_s", OP_TIMEOUT_S))
        except ValueError:
            raise ConfigError("queue URL: timeout_s must be a number of seconds") from None
        if not prefix or any(c.isspace() for c in prefix):
            raise ConfigError(f"queue URL: prefix {prefix!r} must be non-empty, without spaces")
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            client = aioredis.Redis.from_url(clean, socket_connect_timeout=5.0, socket_timeout=None)
        except ValueError as exc:  # redis-py: a value it cannot read
            raise ConfigError(f"queue URL: {exc}") from None
        return cls(client, settings, prefix=prefix, op_timeout_s=timeout_s)

    @property
    def consumer(self) -> str:
        return self._consumer

    # ------------------------------------------------------------ plumbing
    async def _ensure_groups(self) -> None:
        if self._groups_made:
            return
        async with asyncio.timeout(self._op_timeout_s):
            pipe = self._client.pipeline(transaction=False)
            for key in [*self._ready_keys, self.inbox_key]:
                pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                    raise result
        self._groups_made = True

    def _evalsha(self, name: str, args: Sequence[Any]) -> bytes:
        return b"".join((b"*%d\r\n" % (3 + len(self._keys) + len(args)), self._heads[name],
                         bulks(*args)))  # fmt: skip

    async def _eval(self, name: str, args: Sequence[Any], timeout_s: float | None = None) -> Any:
        packed = self._evalsha(name, args)
        for attempt in (1, 2, 3):
            try:
                await self._ensure_groups()
                async with asyncio.timeout(timeout_s or self._op_timeout_s):
                    [reply] = await self._lines.call(packed)
            except (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError) as exc:
                raise QueueUnavailable(f"redis queue: {type(exc).__name__}: {exc}") from exc
            if not isinstance(reply, ReplyError):
                return reply
            if attempt < 3 and await self._mend(reply, name):
                continue
            raise QueueError(f"redis queue script {name}: {reply}")
        raise AssertionError("unreachable")

    async def _mend(self, error: ReplyError, name: str) -> bool:
        """Repair what ``error`` (of script ``name``) says is missing; False if it is
        not that kind of error."""
        text = str(error)
        if text.startswith("NOSCRIPT"):  # the server lost its scripts (restart, FLUSH)
            await self._cmd(self._load_script, name)
            return True
        if "NOGROUP" in text:  # keys deleted under us: recreate
            self._groups_made = False
            return True
        return False

    async def _load_script(self, name: str) -> None:
        await self._client.script_load(self._scripts[name].script)

    async def _cmd(self, coro_fn: Any, *args: Any, timeout_s: float | None = None) -> Any:
        try:
            await self._ensure_groups()
            async with asyncio.timeout(timeout_s or self._op_timeout_s):
                return await coro_fn(*args)
        except rexc.ResponseError as exc:
            raise QueueError(f"redis queue: {exc}") from exc
        except (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError) as exc:
            raise QueueUnavailable(f"redis queue: {type(exc).__name__}: {exc}") from exc

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
        args: list[Any] = [GROUP, len(entries)]
        for entry in entries:
            args += entry
        return [bool(queued) for queued in await self._eval("enqueue", args)]

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
        have: they need no second round trip. Producers' entries are routed and
        taken by the next claim; entries past ``count`` are handed back. ``acks``
        (as for ack.lua) go first, in the same round trip (``on_acked`` when done).
        """
        timeout_s = block_ms / 1000 + self._op_timeout_s
        reply = await self._cmd(
            self._acked_read, acks, count, block_ms, on_acked, timeout_s=timeout_s
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
        if raw:
            await self._route(raw)
        if len(msgs) > count:  # several streams had new entries: keep the first ones
            await self._hand_back(msgs[count:])
            msgs = msgs[:count]
        return msgs

    async def _acked_read(
        self,
        acks: Sequence[Any],
        count: int,
        block_ms: int,
        on_acked: Callable[[], None] | None,
    ) -> list[Any]:
        """ack.lua (when there are ``acks``), then XREADGROUP BLOCK, written together:
        one round trip. The ack's answer comes back first, before the read waits:
        ``on_acked`` is told then. The read's reply: [[stream, [[id, [field, value,
        ...]], ...]], ...], empty when nothing came."""
        read = b"".join((b"*%d\r\n" % (9 + 2 * self._read_keys), self._read_head,
                         bulks(count, "BLOCK", block_ms), self._read_tail))  # fmt: skip
        acked: list[bool] = []

        def first(reply: Any) -> None:
            acked.append(not isinstance(reply, ReplyError))
            if acked[0] and on_acked is not None:
                on_acked()

        if acks:
            ack_reply, reply = await self._lines.call(
                self._evalsha("ack", [GROUP, *acks]) + read, 2, first
            )
            if not acked[0]:  # lost scripts, say: mend and ack on their own
                if not await self._mend(ack_reply, "ack"):
                    raise QueueError(f"redis queue script ack: {ack_reply}")
                await self._eval("ack", [GROUP, *acks])
                if on_acked is not None:
                    on_acked()
        else:
            [reply] = await self._lines.call(read)
        if isinstance(reply, ReplyError):
            if "NOGROUP" in str(reply):
                self._groups_made = False
            raise QueueError(f"redis queue: XREADGROUP: {reply}")
        return reply or []

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
            *acks,
        ]
        out, raw, wait, buried = await self._eval("reserve", args)
        for call_id, reason in buried:
            self._buried.add(_s(call_id), _s(reason))
        msgs: list[Message] = []
        for prio, eid_b, deliveries, flat in out:
            msg = await self._taken(int(prio), _s(eid_b), _pairs(flat), int(deliveries))
            if msg is not None:
                msgs.append(msg)
        if raw:
            await self._route(raw)
        if not msgs and not raw and wait:
            box.append(int(wait))
        return msgs

    async def _route(self, raw: list[Any]) -> None:
        entries: list[list[Any]] = []
        for eid_b, times, flat in raw:
            eid = _s(eid_b)
            fields = _pairs(flat)
            if fields.keys() == {WAKE}:  # a delayed push woke us (enqueue.lua): drop it
                entries.append(["", 0, eid, 0])
                continue
            try:
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
        await self._enqueue(entries)

    async def _bury(self, src: str, eid: str, key: str, reason: str, deliveries: int) -> None:
        await self._eval("bury", [GROUP, src, eid, key, reason, deliveries])

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
        key = _dead_key(fields, fallback)
        await self._bury(src, eid, key, reason, deliveries)
        if src != "inbox" and fields.get(b"id") == key.encode():
            self._buried.add(key, reason)

    def take_buried(self) -> list[Buried]:
        return self._buried.take()

    async def _hand_back(self, msgs: list[Message]) -> None:
        for msg in msgs:
            await self.release(msg)

    @staticmethod
    def _where(msg: Message) -> tuple[str, str]:
        prio, _, eid = msg.receipt.partition("|")
        return prio, eid

    async def ack(self, msg: Message) -> None:
        await self.ack_many([msg])

    async def ack_many(self, msgs: Sequence[Message]) -> None:
        if msgs:
            await self._eval("ack", [GROUP, *self._ack_args(msgs)])

    def _ack_args(self, msgs: Sequence[Message]) -> list[Any]:
        args: list[Any] = []
        for msg in msgs:
            args += (*self._where(msg), msg.call.id)
        return args

    async def release(self, msg: Message, delay_s: float = 0.0) -> None:
        delay_ms = int(wire.check_delay(delay_s) * 1000)
        prio, eid = self._where(msg)
        prior = max(msg.deliveries - 1, 0)
        await self._eval("release", [GROUP, self._consumer, prio, eid, delay_ms, prior])

    async def extend(self, msg: Message) -> None:
        prio, eid = self._where(msg)
        if not await self._eval("extend", [GROUP, self._consumer, prio, eid, msg.deliveries]):
            raise ReservationLost(f"message {msg.call.id}: reservation {msg.receipt} is gone")

    async def dead_letter(self, msg: Message, reason: str) -> None:
        prio, eid = self._where(msg)
        await self._bury(prio, eid, msg.call.id, reason, msg.deliveries)

    # --------------------------------------------------------- dead letters
    async def dead_list(self, limit: int = 100) -> list[DeadLetter]:
        entries = await self._cmd(self._client.xrange, self._keys[7], "-", "+", limit)
        return [self._dead_letter(fields) for _, fields in entries]

    def _dead_letter(self, fields: dict[bytes, bytes]) -> DeadLetter:
        key = _s(fields.get(b"_key", b"?"))
        original = {k: v for k, v in fields.items() if not k.startswith(b"_")}
        try:
            call: Call | None = wire.decode_fields(original, self._max_body, default_id=key).call
        except wire.WireError:
            call = None
        raw = json.dumps(
            {
                k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                for k, v in original.items()
            },
            ensure_ascii=False,
        ).encode()
        return DeadLetter(
            id=key,
            reason=_s(fields.get(b"_reason", b"")),
            deliveries=int(fields.get(b"_deliveries", b"0")),
            died_at=wire.from_ms(int(fields.get(b"_died", b"0"))),
            raw=raw,
            call=call,
        )

    async def dead_requeue(self, ids: Sequence[str] | None = None) -> int:
        if ids is not None:
            return int(await self._eval("requeue", ["ids", 0, *ids])) if ids else 0
        total = 0
        while True:
            moved = int(await self._eval("requeue", ["all", REQUEUE_BATCH]))
            total += moved
            if moved < REQUEUE_BATCH:
                return total

    async def dead_purge(self, ids: Sequence[str] | None = None) -> int:
        if ids is None:
            return int(await self._eval("purge", ["all"]))
        return int(await self._eval("purge", ["ids", *ids])) if ids else 0

    async def stats(self) -> QueueStats:
        ready, delayed, reserved, dead = await self._eval("stats", [GROUP])
        return QueueStats(ready=ready, delayed=delayed, reserved=reserved, dead=dead)

    async def close(self) -> None:
        try:
            if self._groups_made:
                # Unreachable server: the consumer's name just stays registered (harmless).
                with contextlib.suppress(QueueError):
                    await self._eval("leave", [GROUP, self._consumer])
        finally:
            self._lines.close()
            if self._owns_client:
                await self._client.aclose()
