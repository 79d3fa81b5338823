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
  business, and the status still says how it went.
* header block over ``max_header_bytes`` (FN_MAX_HDR_RESPONSE_SIZE, 0 =
  10 MiB): ResponseTooBig, a DispatchError, so the container is retired.

Response header names come back in canonical form (``Content-Type``,
``Fn-Fdk-Version``), whatever the function's spelling.

Anything else that goes wrong on the socket (refused, reset, malformed
answer) is a DispatchError; running past ``timeout_s`` is TimeoutError.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import cast

from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.errors import DispatchError, InvalidResponse, ResponseTooBig
from worker.agent.http1 import HeadTooBig, Incomplete, ParseError, RawResponse, ResponseParser

DEFAULT_MAX_HEADER_BYTES = 10 * 1024 * 1024
KEEPALIVE_S = 60.0  # below the Python FDK's 75 s, so the worker always closes first

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
_REQUEST_LINE = b"POST /call HTTP/1.1\r\nHost: localhost\r\nContent-Length: "


def rfc3339(moment: datetime) -> str:
    utc = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def request_headers(req: DispatchRequest) -> dict[str, str]:
    """The call's headers minus hop-by-hop ones, plus the Fn ones."""
    out = {
        name: value
        for name, value in req.headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in _SET_BY_CLIENT
    }
    out["Fn-Call-Id"] = req.call_id
    out["Fn-Deadline"] = rfc3339(req.deadline)
    return out


def encode_request(req: DispatchRequest) -> bytes:
    """The whole request as bytes (the call's headers were checked by the agent)."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in request_headers(req).items())
    return b"".join(
        (_REQUEST_LINE, str(len(req.body)).encode(), b"\r\n", lines.encode(), b"\r\n", req.body)
    )


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
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

    async def exchange(self, request: bytes) -> RawResponse:
        transport = self._transport
        if transport is None or self.closed:
            raise ConnectionResetError("the connection is closed")
        self._parser = ResponseParser(self._max_header, self._max_body)
        waiter: asyncio.Future[RawResponse] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            transport.write(request)
            return await waiter
        finally:
            self._parser = self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class FdkClient:
    """Speaks to one function's listener socket."""

    def __init__(
        self, socket_path: str, max_response_bytes: int = 0, max_header_bytes: int = 0
    ) -> None:
        self.socket_path = socket_path
        self._max_body = max_response_bytes
        self._max_header = max_header_bytes or DEFAULT_MAX_HEADER_BYTES
        self._conn: _Connection | None = None
        self.connections_made = 0  # more than one means keep-alive was lost at some point

    async def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _connection(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed and loop.time() - conn.last_used < KEEPALIVE_S:
            return conn
        self._drop()
        _, conn = await loop.create_unix_connection(
            lambda: _Connection(self._max_header, self._max_body), self.socket_path
        )
        self.connections_made += 1
        self._conn = conn
        return conn

    async def call(self, req: DispatchRequest) -> DispatchResult:
        """POST /call; DispatchError (or ResponseTooBig) on failure, TimeoutError on time."""
        loop = asyncio.get_running_loop()
        request = encode_request(req)
        try:
            async with asyncio.timeout(req.timeout_s):
                conn = await self._connection(loop)
                raw = await conn.exchange(request)
        except BaseException as exc:
            self._drop()  # whatever happened, the connection's state is unknown
            if isinstance(exc, HeadTooBig):
                raise ResponseTooBig(f"function {exc}") from exc
            if isinstance(exc, Incomplete):  # the function may have died: not its answer's fault
                raise DispatchError(f"error receiving function response: {exc}") from exc
            if isinstance(exc, ParseError):
                raise InvalidResponse(f"malformed function response: {exc}") from exc
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise DispatchError(f"error receiving function response: {exc}") from exc
            raise
        if raw.keep_alive:
            conn.last_used = loop.time()
        else:
            self._drop()
        return DispatchResult(raw.status, response_headers(raw), raw.body, raw.truncated)


@functools.lru_cache(maxsize=1024)
def canonical_name(name: str) -> str:
    """``content-type`` -> ``Content-Type``: header names are case-insensitive, and
    records keep one spelling (the one Fn's Go agent uses)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def response_headers(raw: RawResponse) -> Mapping[str, str]:
    """The answer's headers minus hop-by-hop ones, names in canonical form; repeated
    names joined with ", "."""
    out: dict[str, str] = {}
    for name, value in raw.headers:
        if name.lower() in HOP_BY_HOP:
            continue
        key = canonical_name(name)
        out[key] = f"{out[key]}, {value}" if key in out else value
    return MappingProxyType(out)
