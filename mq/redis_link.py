"""The Redis queue's round trips (mq.redis): its Lua scripts and redis-py commands.

Each script is mq/lua/NAME.lua prefixed with common.lua, sent as EVALSHA over
the lean connections (mq.resp) with its keys packed once. A server that lost
its scripts (restart, FLUSH) is sent them again; consumer groups deleted under
the queue are made again. The few other commands (making the groups, loading
scripts, listing dead letters) go through redis-py. Every round trip is
bounded in time: a connection that fails or times out, or a server that does
not speak Redis (another service on its port), raises QueueUnavailable,
a script's error reply QueueError. A lean connection that hears nothing from
the server's host for the time limit of a round trip is given up even while
it waits in a blocking read (mq.resp, ``dead_after``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.connection import SSLConnection
from redis.commands.core import AsyncScript

from mq.errors import QueueError, QueueUnavailable
from mq.resp import Lines, ReplyError, bulks

_SCRIPTS = (
    "enqueue",
    "reserve",
    "ack",
    "release",
    "handback",
    "extend",
    "bury",
    "requeue",
    "purge",
    "leave",
    "stats",
)

# What a round trip fails with when the server is down, slow, or not a Redis
# server at all (another service on that port): QueueUnavailable.
FAULTS = (rexc.ConnectionError, rexc.TimeoutError, rexc.InvalidResponse, TimeoutError, OSError)


def unavailable(what: str, exc: BaseException, timeout_s: float) -> QueueUnavailable:
    """The QueueUnavailable of ``what`` ("redis queue") for ``exc``, one of FAULTS."""
    if isinstance(exc, rexc.InvalidResponse):
        reason = f"the server there does not speak Redis ({exc}): check the host and port"
    elif isinstance(exc, TimeoutError) and not str(exc):
        reason = f"no answer within {timeout_s:g} s (timeout_s)"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return QueueUnavailable(f"{what}: {reason}")


@functools.cache
def _lua(name: str) -> str:
    folder = Path(__file__).with_name("lua")
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


class RedisLink:
    """A RedisQueue's connections: redis-py's ``client`` and the lean ``lines``.

    ``keys`` are the KEYS of every script; ``group_keys`` the streams read by
    consumer group ``group``, made on first use (``groups_made``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: list[str],
        op_timeout_s: float,
        *,
        group: str,
        group_keys: list[str],
    ) -> None:
        self.client = client
        self.keys = keys
        self._group = group
        self._group_keys = group_keys
        self._op_timeout_s = op_timeout_s
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(_lua(name)) for name in _SCRIPTS
        }
        pool = client.connection_pool
        self.lines = Lines(
            pool.connection_kwargs,
            tls=issubclass(pool.connection_class, SSLConnection),
            connect_timeout_s=pool.connection_kwargs.get("socket_connect_timeout") or op_timeout_s,
            dead_after_s=op_timeout_s,
        )
        # EVALSHA NAME's keys, encoded once: per call only the arguments are packed.
        self._heads = {
            name: bulks("EVALSHA", script.sha, len(self.keys), *self.keys)
            for name, script in self._scripts.items()
        }
        self.groups_made = False
        # One task makes the groups; the others of a first burst wait for it (each
        # making them too would take one of redis-py's connections apiece, and past
        # its max_connections, fail).
        self._making_groups = asyncio.Lock()

    async def ensure_groups(self) -> None:
        if self.groups_made:
            return
        async with asyncio.timeout(self._op_timeout_s), self._making_groups:
            if self.groups_made:
                return
            pipe = self.client.pipeline(transaction=False)
            for key in self._group_keys:
                pipe.xgroup_create(key, self._group, id="0", mkstream=True)
            for result in await pipe.execute(raise_on_error=False):
                if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                    raise result
            self.groups_made = True

    def evalsha(self, name: str, args: Sequence[Any]) -> bytes:
        return b"".join((b"*%d\r\n" % (3 + len(self.keys) + len(args)), self._heads[name],
                         bulks(*args)))  # fmt: skip

    async def eval(self, name: str, args: Sequence[Any], timeout_s: float | None = None) -> Any:
        packed = self.evalsha(name, args)
        for attempt in (1, 2, 3):
            try:
                await self.ensure_groups()
                async with asyncio.timeout(timeout_s or self._op_timeout_s):
                    [reply] = await self.lines.call(packed)
            except FAULTS as exc:
                raise unavailable("redis queue", exc, timeout_s or self._op_timeout_s) from exc
            if not isinstance(reply, ReplyError):
                return reply
            if attempt < 3 and await self.mend(reply, name):
                continue
            raise QueueError(f"redis queue script {name}: {reply}")
        raise AssertionError("unreachable")

    async def mend(self, error: ReplyError, name: str) -> bool:
        """Repair what ``error`` (of script ``name``) says is missing; False if it is
        not that kind of error."""
        text = str(error)
        if text.startswith("NOSCRIPT"):  # the server lost its scripts (restart, FLUSH)
            await self.cmd(self._load_script, name)
            return True
        if "NOGROUP" in text:  # keys deleted under us: recreate
            self.groups_made = False
            return True
        return False

    async def _load_script(self, name: str) -> None:
        await self.client.script_load(self._scripts[name].script)

    async def cmd(self, coro_fn: Any, *args: Any, timeout_s: float | None = None) -> Any:
        try:
            await self.ensure_groups()
            async with asyncio.timeout(timeout_s or self._op_timeout_s):
                return await coro_fn(*args)
        except rexc.ResponseError as exc:
            raise QueueError(f"redis queue: {exc}") from exc
        except FAULTS as exc:
            raise unavailable("redis queue", exc, timeout_s or self._op_timeout_s) from exc

    async def acked_read(
        self, read: bytes, acks: Sequence[Any], on_acked: Callable[[], None] | None
    ) -> list[Any]:
        """ack.lua (when there are ``acks``), then ``read`` (XREADGROUP BLOCK), written
        together: one round trip. The ack's answer comes back first, before the read
        waits: ``on_acked`` is told then. The read's reply: [[stream, [[id, [field,
        value, ...]], ...]], ...], empty when nothing came."""
        acked: list[bool] = []

        def first(reply: Any) -> None:
            acked.append(not isinstance(reply, ReplyError))
            if acked[0] and on_acked is not None:
                on_acked()

        if acks:
            ack_reply, reply = await self.lines.call(
                self.evalsha("ack", [self._group, *acks]) + read, 2, first
            )
            if not acked[0]:  # lost scripts, say: mend and ack on their own
                if not await self.mend(ack_reply, "ack"):
                    raise QueueError(f"redis queue script ack: {ack_reply}")
                await self.eval("ack", [self._group, *acks])
                if on_acked is not None:
                    on_acked()
        else:
            [reply] = await self.lines.call(read)
        if isinstance(reply, ReplyError):
            if "NOGROUP" in str(reply):
                self.groups_made = False
            raise QueueError(f"redis queue: XREADGROUP: {reply}")
        return reply or []
