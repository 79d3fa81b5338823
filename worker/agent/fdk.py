"""The hot-function call: HTTP/1.1 over the function's unix socket.

One :class:`FdkClient` per container keeps at most one connection open and
sends one request at a time, ``POST http://localhost/call``, as the FDKs
expect. It passes the call's headers through except the hop-by-hop ones, and
adds ``Fn-Call-Id`` and ``Fn-Deadline`` (RFC 3339, UTC, milliseconds).

Limits on what comes back:

* body over ``max_response_bytes`` (FN_MAX_RESPONSE_SIZE, 0 = none): the first
  ``max_response_bytes`` bytes are kept and the result says ``truncated=True``;
  the rest is not read and the connection is dropped (the next call opens a
  new one). The container stays usable: a big answer is the function's
  business, and the status still says how it went.
* header block over ``max_header_bytes`` (FN_MAX_HDR_RESPONSE_SIZE, 0 =
  10 MiB): ResponseTooBig, a DispatchError, so the container is retired.

Anything else that goes wrong on the socket (refused, reset, malformed
answer) is a DispatchError; running past ``timeout_s`` is TimeoutError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType

import aiohttp
from yarl import URL

from worker.agent.driver import DispatchRequest, DispatchResult
from worker.agent.errors import DispatchError, InvalidResponse, ResponseTooBig

DEFAULT_MAX_HEADER_BYTES = 10 * 1024 * 1024
KEEPALIVE_S = 60.0  # below the Python FDK's 75 s, so the worker always closes first
_READ_CHUNK_BYTES = 64 * 1024
_CALL_URL = URL("http://localhost/call")  # parsed once: the host part is ignored on a socket

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


class FdkClient:
    """Speaks to one function's listener socket."""

    def __init__(
        self, socket_path: str, max_response_bytes: int = 0, max_header_bytes: int = 0
    ) -> None:
        self.socket_path = socket_path
        self._max_body = max_response_bytes
        self._max_header = max_header_bytes or DEFAULT_MAX_HEADER_BYTES
        self._session: aiohttp.ClientSession | None = None
        self.connections_made = 0  # more than one means keep-alive was lost at some point

    async def _counted(self, *_args: object) -> None:
        self.connections_made += 1

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.UnixConnector(
                path=self.socket_path, limit=1, keepalive_timeout=KEEPALIVE_S
            )
            tracing = aiohttp.TraceConfig()
            tracing.on_connection_create_end.append(self._counted)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # a function's cookies mean nothing here
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                max_line_size=self._max_header,
                max_field_size=self._max_header,
                max_headers=4096,
                timeout=aiohttp.ClientTimeout(total=None),
                trace_configs=[tracing],
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, req: DispatchRequest) -> DispatchResult:
        """POST /call; DispatchError (or ResponseTooBig) on failure, TimeoutError on time."""
        session = self._sess()
        try:
            async with asyncio.timeout(req.timeout_s):
                async with session.post(
                    _CALL_URL, data=req.body, headers=request_headers(req)
                ) as resp:
                    headers = _response_headers(resp, self._max_header)
                    body, truncated = await self._read_body(resp)
                    if truncated:
                        resp.close()  # drop the rest and the connection with it
                    return DispatchResult(resp.status, headers, body, truncated)
        except TimeoutError:
            raise  # the call ran out of time (TimeoutError is also an OSError)
        except aiohttp.ClientResponseError as exc:
            raise _too_big_or(exc, self._max_header) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DispatchError(f"error receiving function response: {exc}") from exc

    async def _read_body(self, resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
        if not self._max_body:
            return await resp.read(), False
        parts: list[bytes] = []
        size = 0
        while size <= self._max_body:
            chunk = await resp.content.read(_READ_CHUNK_BYTES)
            if not chunk:
                return b"".join(parts), False
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[: self._max_body], True


def _response_headers(resp: aiohttp.ClientResponse, limit: int) -> Mapping[str, str]:
    total = 0
    out: dict[str, str] = {}
    for name, value in resp.headers.items():
        total += len(name) + len(value) + 4
        if name.lower() in HOP_BY_HOP:
            continue
        out[name] = f"{out[name]}, {value}" if name in out else value
    if total > limit:
        raise ResponseTooBig(f"function response headers are over {limit} bytes ({total})")
    return MappingProxyType(out)


def _too_big_or(exc: aiohttp.ClientResponseError, limit: int) -> DispatchError:
    text = str(exc.message or exc)
    if "too long" in text.lower() or "more than" in text.lower() or "too many" in text.lower():
        return ResponseTooBig(f"function response headers are over the limit ({limit} bytes)")
    return InvalidResponse(f"malformed function response: {text}")
