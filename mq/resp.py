"""Lean Redis connections for the queue's per-call commands.

A consumer sends a few commands per call (the reserve script, the blocking
read, the acks). Through redis-py's client each one costs tens of
microseconds of Python: argument encoding, a pool with health checks, retry
and observability layers. Here a command is bytes the caller packs once
(``pack``), written to an asyncio protocol, and its reply is parsed by
hiredis: a round trip costs a few microseconds of Python.

``Lines`` keeps idle connections for reuse. Several commands may be written
at once (pipelined); their replies come back in order. A connection whose
caller stops waiting (timeout, cancellation) may still get the reply, so it
is closed, never reused. The queue's scripts (statistics and dead-letter
requeue and purge among them) go over these connections; the rest (loading
scripts, making groups, listing dead letters) keeps using redis-py.

The connection settings are those of the redis-py client the URL made
(host and port or unix socket, database, user, password, TLS options), so both speak to the
same server the same way. These connections speak RESP2 whatever protocol
the client was told to use.

A TCP connection is given up once nothing at all has come from the server's
host for ``dead_after_s`` (config.tcp): a silent network, or a server that
forgot the connection while the network was out, ends even a blocking read
that would otherwise wait for its whole block time, with ConnectionError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import hiredis

from config.tcp import dead_after

MAX_IDLE = 4  # idle connections kept for reuse


class ReplyError(Exception):
    """The server answered a command with an error (``-ERR ...``)."""


class Unanswered(ConnectionError):
    """The connection failed before the first reply came."""


class Silent(ConnectionError):
    """The connection was given up: nothing came from the server's host for too long
    (config.tcp). Another connection would find the network as silent."""


def pack(*args: str | int | bytes) -> bytes:
    """One command (a RESP array of bulk strings)."""
    return b"*%d\r\n%s" % (len(args), bulks(*args))


def bulks(*args: str | int | bytes) -> bytes:
    """``args`` as RESP bulk strings (the elements of a command array)."""
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(f"{type(arg).__name__} is not a redis argument here")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Line(asyncio.Protocol):
    """One connection: replies are handed to the waiting futures in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while self._waiters:
                reply = self._reader.gets()
                if reply is False:
                    return
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"redis protocol error: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
            self._fail(Silent(f"redis connection lost: nothing came from the server ({exc})"))
            return
        self._fail(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def _fail(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, data: bytes, replies: int, loop: asyncio.AbstractEventLoop) -> list[Any]:
        """Write ``data`` (``replies`` commands); the futures of their replies."""
        if self._transport is None or self.closed:
            raise ConnectionError("redis connection closed")
        futures = [loop.create_future() for _ in range(replies)]
        self._waiters.extend(futures)
        self._transport.write(data)
        return futures

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


def _ssl_context(kwargs: Mapping[str, Any]) -> ssl.SSLContext:
    """A TLS context from redis-py's ``ssl_*`` connection options."""
    ctx = ssl.create_default_context(
        cafile=kwargs.get("ssl_ca_certs"),
        capath=kwargs.get("ssl_ca_path"),
        cadata=kwargs.get("ssl_ca_data"),
    )
    reqs = kwargs.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(
            reqs.lower(), ssl.CERT_REQUIRED
        )
    ctx.check_hostname = bool(kwargs.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    if kwargs.get("ssl_certfile"):
        ctx.load_cert_chain(
            kwargs["ssl_certfile"], kwargs.get("ssl_keyfile"), kwargs.get("ssl_password")
        )
    return ctx


class Lines:
    """Connections to one server, opened on demand and reused while healthy."""

    def __init__(
        self,
        kwargs: Mapping[str, Any],
        *,
        tls: bool,
        connect_timeout_s: float,
        dead_after_s: float | None = None,
    ) -> None:
        self._path: str | None = kwargs.get("path")  # a unix socket (unix:// URLs)
        self._host = str(kwargs.get("host", "localhost"))
        self._port = int(kwargs.get("port", 6379))
        self._db = int(kwargs.get("db", 0) or 0)
        self._username: str | None = kwargs.get("username")
        self._password: str | None = kwargs.get("password")
        self._ssl = _ssl_context(kwargs) if tls else None
        self._connect_timeout_s = connect_timeout_s
        self._dead_after_s = dead_after_s  # None: the system's TCP settings
        self._idle: list[_Line] = []
        self._closed = False

    async def call(
        self,
        data: bytes,
        replies: int = 1,
        on_first: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """Send ``data`` (``replies`` commands), return their replies in order.

        An error reply is returned as a ``ReplyError`` (the others still count);
        ``on_first`` is called with the first reply as soon as it is in. Raises
        ConnectionError or OSError when the connection fails. An idle connection
        the server closed meanwhile (a restart, a client timeout) is replaced once
        if it fails before any reply (not one given up for silence: ``Silent``):
        the commands may then run twice, which the queue's commands allow (an ack
        is idempotent; a reservation made twice lapses and the message is
        delivered again).
        """
        loop = asyncio.get_running_loop()
        while self._idle:
            line = self._idle.pop()
            if not line.closed:
                with contextlib.suppress(Unanswered):
                    return await self._exchange(line, data, replies, on_first, loop)
                break
        return await self._exchange(await self._open(loop), data, replies, on_first, loop)

    async def _exchange(
        self,
        line: _Line,
        data: bytes,
        replies: int,
        on_first: Callable[[Any], None] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> list[Any]:
        reusable = False
        out: list[Any] = []
        try:
            for future in line.send(data, replies, loop):
                try:
                    reply = await future
                except ConnectionError as exc:
                    if out or isinstance(exc, Silent):
                        raise
                    raise Unanswered(str(exc)) from exc
                if isinstance(reply, hiredis.ReplyError):
                    reply = ReplyError(str(reply))
                out.append(reply)
                if on_first is not None and len(out) == 1:
                    on_first(reply)
            reusable = True
            return out
        finally:
            if reusable and not line.closed and not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(line)
            else:
                line.close()

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Line:
        if self._closed:
            raise ConnectionError("redis connections closed")
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await self._connect(loop)
        except TimeoutError:
            where = self._path or f"{self._host}:{self._port}"
            raise ConnectionError(
                f"no connection to {where} within {self._connect_timeout_s:g} s"
            ) from None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Line:
        if self._path is not None:
            _, line = await loop.create_unix_connection(_Line, self._path)
        else:
            transport, line = await loop.create_connection(
                _Line, self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )  # fmt: skip
            if self._dead_after_s is not None:
                dead_after(transport, self._dead_after_s)
        try:
            await self._handshake(line, loop)
        except BaseException:
            line.close()
            raise
        return line

    async def _handshake(self, line: _Line, loop: asyncio.AbstractEventLoop) -> None:
        commands = []
        if self._password is not None:
            user = (self._username,) if self._username else ()
            commands.append(pack("AUTH", *user, self._password))
        if self._db:
            commands.append(pack("SELECT", self._db))
        if not commands:
            return
        for reply in [await f for f in line.send(b"".join(commands), len(commands), loop)]:
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"redis refused the connection: {reply}")

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for line in idle:
            line.close()
