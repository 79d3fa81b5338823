"""The hot-function call: HTTP/1.1 over the function's unix socket.

One :class:`FdkClient` per container keeps at most one connection open and
sends one request at a time, ``POST /call``, as the FDKs expect. It passes
the call's headers through except the hop-by-hop ones, and adds
``Fn-Call-Id`` and ``Fn-Deadline`` (RFC 3339, UTC, milliseconds).

This is the one request the worker makes per call, always the same shape, so
it is written straight onto an asyncio transport and the answer is read by
the small parser in :mod:`worker.agent.http1`; a general HTTP client session
spends more time per call than the function itself (docs/PERFORMANCE.md).

Limits on what comes back:

* body over ``max_response_bytes`` (FN_MAX_RESPONSE_SIZE, 0 = none): the first
  ``max_response_bytes`` bytes are kept and the result says ``truncated=True``;
  the rest is not read and the connection is dropped (the next call opens a
  new one). The container stays usable: a big answer is the function's
  business. The result keeps the function's status; the agent ends a 200
  that came back truncated as an error (worker.agent.execution).
* header block over ``max_header_bytes`` (FN_MAX_HDR_RESPONSE_SIZE, 0 =
  10 MiB): ResponseTooBig, a DispatchError, so the container is retired.

Response header names come back in canonical form (``Content-Type``,
``Fn-Fdk-Version``), whatever the function's spelling.

Anything else that goes wrong on the socket (refused, reset, malformed
answer) is a DispatchError; running past ``timeout_s`` is TimeoutError, unless
the function never took the connection by then: NotAccepted. A unix connect
completes once the listener's backlog has room, before the function accepts
the connection, so a connection that never brought a byte back is looked up
in the kernel's socket diagnostics at the timeout (worker.agent.unixdiag): if
it still waits in the backlog, the call never reached the function. A backlog
that is full takes no connection at all; the connect is tried again until
the call's timeout (no event tells when the backlog has room).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import cast

from config.errors import AgentError
from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.errors import (
    DispatchError,
    InvalidResponse,
    NotAccepted,
    NotDelivered,
    ResponseTooBig,
    host_short,
)
from worker.agent.http1 import (
    CACHED_NAME_BYTES,
    HeadTooBig,
    Incomplete,
    ParseError,
    RawResponse,
    ResponseParser,
)
from worker.agent.unixdiag import peer_accepted, socket_inode

DEFAULT_MAX_HEADER_BYTES = 10 * 1024 * 1024
KEEPALIVE_S = 60.0  # below the Python FDK's 75 s, so the worker always closes first
FULL_BACKLOG_FIRST_S = 0.005  # a full backlog: the connect is tried again after this,
FULL_BACKLOG_MAX_S = 0.1  # doubling up to this

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_SET_BY_CLIENT = frozenset({"host", "content-length", "fn-call-id", "fn-deadline"})
_REQUEST_HEAD = (
    "POST /call HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n%s"
    "Fn-Call-Id: %s\r\nFn-Deadline: %s\r\n\r\n"
)


def rfc3339(moment: datetime) -> str:
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def _passed_headers(req: DispatchRequest) -> Iterator[tuple[str, str]]:
    """The call's own headers that go to the function: not hop-by-hop, not ours."""
    for name, value in req.headers.items():
        key = name.lower()
        if key not in HOP_BY_HOP and key not in _SET_BY_CLIENT:
            yield name, value


def request_headers(req: DispatchRequest) -> dict[str, str]:
    """The call's headers minus hop-by-hop ones, plus the Fn ones."""
    out = dict(_passed_headers(req))
    out["Fn-Call-Id"] = req.call_id
    out["Fn-Deadline"] = rfc3339(req.deadline)
    return out


def encode_request(req: DispatchRequest) -> bytes:
    """The whole request as bytes (the call's headers were checked by the agent):
    what :func:`request_headers` gives, in one formatting step."""
    own = (
        "".join(f"{name}: {value}\r\n" for name, value in _passed_headers(req))
        if req.headers
        else ""
    )
    head = _REQUEST_HEAD % (len(req.body), own, req.call_id, rfc3339(req.deadline))
    return head.encode() + req.body


class _Connection(asyncio.Protocol):
    """One connection to the socket; at most one exchange at a time."""

    def __init__(self, max_header: int, max_body: int) -> None:
        self._max_header = max_header
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None
        self._waiter: asyncio.Future[RawResponse] | None = None
        self.closed = False
        self.last_used = 0.0
        self.inode = 0  # of the socket, for the kernel's socket diagnostics
        self.answered = False  # a byte came back: the function has taken the connection
        self.unaccepted = False  # at the timeout, the connection still waited in the backlog

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.answered = True
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            response = parser.feed(data)
        except ParseError as exc:
            waiter.set_exception(exc)
            self.close()
            return
        if response is not None:
            self._parser = None
            waiter.set_result(response)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        parser, waiter = self._parser, self._waiter
        if waiter is None or waiter.done():
            return
        if parser is not None and exc is None:
            try:
                waiter.set_result(parser.feed_eof())
            except ParseError as error:
                waiter.set_exception(error)
            return
        waiter.set_exception(exc or ConnectionResetError("the function closed the connection"))

    async def exchange(
        self, request: bytes, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> RawResponse:
        """Send ``request``, return the answer; TimeoutError once ``deadline`` (loop
        time) passes. One timer, not a timeout scope: this is the per-call path."""
        transport = self._transport
        if transport is None or self.closed:
            raise ConnectionResetError("the connection is closed")
        self._parser = ResponseParser(self._max_header, self._max_body)
        waiter: asyncio.Future[RawResponse] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, self._expire, waiter)
        try:
            transport.write(request)
            return await waiter
        finally:
            timer.cancel()
            self._parser = self._waiter = None

    def _expire(self, waiter: asyncio.Future[RawResponse]) -> None:
        if not waiter.done():
            # Looked up before the close, while the connection still exists.
            self.unaccepted = (
                not self.answered and self.inode != 0 and peer_accepted(self.inode) is False
            )
            waiter.set_exception(TimeoutError())
            self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class FdkClient:
    """Speaks to one function's listener socket.

    ``opener``, when given, is asked for the socket before each connection: an
    ``O_PATH`` descriptor of the checked socket (worker.agent.iofs.open_listener),
    connected to through ``/proc/self/fd``, so that the container cannot point
    ``socket_path`` elsewhere between the check and the connect. An AgentError it
    raises fails the connection as NotDelivered.
    """

    def __init__(
        self,
        socket_path: str,
        max_response_bytes: int = 0,
        max_header_bytes: int = 0,
        *,
        opener: Callable[[], int] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._max_body = max_response_bytes
        self._max_header = max_header_bytes or DEFAULT_MAX_HEADER_BYTES
        self._opener = opener
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: see call()
        self.connections_made = 0  # more than one means keep-alive was lost at some point

    async def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _connect(self, deadline: float) -> _Connection:
        self._drop()
        fd = None
        sock: socket.socket | None = None
        try:
            path = self.socket_path
            if self._opener is not None:
                fd = self._opener()
                path = f"/proc/self/fd/{fd}"
            sock = await _connected_socket(path, deadline)
            inode = socket_inode(sock.fileno())
            async with asyncio.timeout_at(deadline):  # connected already: no wait really
                _, conn = await asyncio.get_running_loop().create_unix_connection(
                    lambda: _Connection(self._max_header, self._max_body), sock=sock
                )
            sock = None  # the transport's from now on
        except (TimeoutError, NotAccepted):
            raise
        except (OSError, AgentError) as exc:  # no listener (a dead container), or one
            # the rules refuse: the request never left
            short = host_short(exc, "connecting to a function's socket")
            if short is not None:  # no descriptor left: not the container's doing
                raise short from exc
            raise NotDelivered(f"cannot connect to the function: {exc}") from exc
        finally:
            if sock is not None:
                sock.close()
            if fd is not None:
                os.close(fd)
        conn.inode = inode
        self.connections_made += 1
        self._conn = conn
        return conn

    async def call(
        self, req: DispatchRequest, on_delivered: Callable[[], None] | None = None
    ) -> DispatchResult:
        """POST /call; DispatchError (or ResponseTooBig) on failure, TimeoutError on time.
        ``on_delivered`` is called once the socket has taken the connection (a kept-alive
        one, or a new one), just before the request is written; NotDelivered (no
        connection) comes before it. NotAccepted may come after it: at the timeout,
        the function had not accepted the connection (see the module's notes)."""
        loop = self._loop
        if loop is None:  # CPython 3.11 makes a system call in each get_running_loop
            loop = self._loop = asyncio.get_running_loop()
        request = encode_request(req)
        now = loop.time()
        deadline = now + req.timeout_s
        conn: _Connection | None = None
        try:
            conn = self._conn
            if conn is None or conn.closed or now - conn.last_used >= KEEPALIVE_S:
                conn = await self._connect(deadline)
            if on_delivered is not None:
                on_delivered()
            raw = await conn.exchange(request, loop, deadline)
        except BaseException as exc:
            self._drop()  # whatever happened, the connection's state is unknown
            if isinstance(exc, TimeoutError) and conn is not None and conn.unaccepted:
                raise NotAccepted(
                    "the connection waited in the function's listener backlog"
                ) from exc
            if isinstance(exc, HeadTooBig):
                raise ResponseTooBig(f"function {exc}") from exc
            # The agent says what broke ("error receiving the function's response: ...").
            if isinstance(exc, Incomplete):  # the function may have died: not its answer's fault
                raise DispatchError(str(exc)) from exc
            if isinstance(exc, ParseError):
                raise InvalidResponse(f"malformed function response: {exc}") from exc
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise DispatchError(str(exc) or type(exc).__name__) from exc
            raise
        if raw.keep_alive:
            conn.last_used = loop.time()
        else:
            self._drop()
        return DispatchResult(raw.status, response_headers(raw), raw.body, raw.truncated)


async def _connected_socket(path: str, deadline: float) -> socket.socket:
    """A socket connected to the listener at ``path``. While the listener's backlog is
    full (EAGAIN) the connect is tried again, pausing a little longer each time, until
    the loop time ``deadline``: then NotAccepted. Nothing signals room in a backlog
    (a unix socket polls writable before it is connected), hence the pauses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        pause = FULL_BACKLOG_FIRST_S
        while True:
            try:
                sock.connect(path)
            except BlockingIOError:
                left = deadline - loop.time()
                if left <= 0:
                    raise NotAccepted("the function's listener backlog stayed full") from None
                await asyncio.sleep(min(pause, left))
                pause = min(2 * pause, FULL_BACKLOG_MAX_S)
                continue
            return sock
    except BaseException:
        sock.close()
        raise


def canonical_name(name: str) -> str:
    """``content-type`` -> ``Content-Type``: header names are case-insensitive, and
    records keep one spelling (the one Fn's Go agent uses)."""
    if len(name) <= CACHED_NAME_BYTES:
        return _cached_canonical(name)
    return _canonical(name)


def _canonical(name: str) -> str:
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


_cached_canonical = functools.lru_cache(maxsize=1024)(_canonical)


def _kept_name(name: str) -> str | None:
    """The canonical name of a response header that is passed on; None for hop-by-hop.
    Names of usual sizes are cached; a long one (the function chose it) is not kept."""
    if len(name) <= CACHED_NAME_BYTES:
        return _cached_kept(name)
    return _kept(name)


def _kept(name: str) -> str | None:
    return None if name.lower() in HOP_BY_HOP else _canonical(name)


_cached_kept = functools.lru_cache(maxsize=1024)(_kept)


def response_headers(raw: RawResponse) -> Mapping[str, str]:
    """The answer's headers minus hop-by-hop ones, names in canonical form; repeated
    names joined with ", "."""
    out: dict[str, str] = {}
    for name, value in raw.headers:
        key = _kept_name(name)
        if key is None:
            continue
        out[key] = f"{out[key]}, {value}" if key in out else value
    return MappingProxyType(out)
