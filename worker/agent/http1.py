"""An incremental HTTP/1.1 response parser for the function's socket (no I/O).

The worker sends one request at a time on a connection and reads exactly
one response back, so the parser takes bytes as they arrive and returns the
:class:`RawResponse` once it is complete. It knows the three ways a body can
end (``Content-Length``, ``chunked``, the connection closing), skips ``1xx``
interim answers, and enforces two limits:

* the header block (status line, headers, chunked trailers) may take at most
  ``max_header_bytes``; more raises :class:`HeadTooBig`;
* the body keeps at most ``max_body_bytes`` (0 = no limit); once more has
  arrived, the response is returned at once with ``truncated=True`` and
  ``keep_alive=False``, since the rest was never read.

Anything malformed raises :class:`MalformedResponse` with what was wrong; a
connection that closes mid-response, :class:`Incomplete`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9]\d\d)(?:[ \t][^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_MAX_CHUNK_LINE = 4096
# What the caches below keep lives as long as the worker, whatever the function sends:
# they take only values of usual sizes (a head up to 10 MiB is parsed, not kept).
CACHED_HEAD_BYTES = 4096
CACHED_NAME_BYTES = 64


class ParseError(Exception):
    """The bytes on the socket are not an acceptable HTTP/1.1 response."""


class MalformedResponse(ParseError):
    pass


class HeadTooBig(ParseError):
    pass


class Incomplete(ParseError):
    """The connection closed before the response was complete."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    truncated: bool
    keep_alive: bool  # whether the connection may carry the next request
    head_bytes: int


class _Frame:
    HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_EOF = range(7)


class ResponseParser:
    """Parse one response; :meth:`feed` until it returns one (or raises)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_buf",
        "_frame",
        "_head_used",
        "_headers",
        "_keep_alive",
        "_left",
        "_max_body",
        "_max_head",
        "_result",
        "_scanned",
        "_status",
    )

    def __init__(self, max_header_bytes: int, max_body_bytes: int = 0) -> None:
        self._max_head = max_header_bytes
        self._max_body = max_body_bytes
        self._buf = bytearray()
        # How much of _buf was searched for the end of the head or line it waits for:
        # each read searches only what is new, so a head that comes a few bytes at a
        # time costs time in proportion to its size, not to its size squared.
        self._scanned = 0
        self._frame = _Frame.HEAD
        self._left = 0
        self._head_used = 0
        self._status = 0
        self._headers: tuple[tuple[str, str], ...] = ()
        self._keep_alive = True
        self._body = bytearray()  # one buffer: a body of many tiny chunks is no list of them
        self._body_size = 0
        self._result: RawResponse | None = None

    @property
    def expects_eof(self) -> bool:
        """True while the body runs until the connection closes."""
        return self._frame == _Frame.UNTIL_EOF

    def feed(self, data: bytes) -> RawResponse | None:
        """Take the next bytes; the response once it is complete, else None."""
        if self._frame == _Frame.HEAD and not self._buf and self._result is None:
            whole = self._whole(data)
            if whole is not None:
                return whole
        self._buf += data
        steps = (
            self._head,
            self._take_counted,
            self._chunk_size,
            self._take_counted,
            self._chunk_end,
            self._trailer,
            self._until_eof,
        )
        # Stop once the body is over its limit: the rest is not read, however it came.
        while self._result is None and not self._over_limit() and steps[self._frame]():
            pass
        if self._result is None and self._over_limit():
            self._done(truncated=True)
        return self._result

    def _over_limit(self) -> bool:
        return self._body_size > self._max_body > 0

    def feed_eof(self) -> RawResponse:
        """The connection closed: the response if it was complete, else Incomplete."""
        if self._frame == _Frame.UNTIL_EOF:
            self._keep_alive = False
            return self._done()
        if self._frame == _Frame.HEAD and not self._buf:
            raise Incomplete("the connection closed without a response")
        raise Incomplete("the connection closed before the response was complete")

    # --------------------------------------------------------------- head

    def _whole(self, data: bytes) -> RawResponse | None:
        """The usual answer, whole in one read: a final status, a Content-Length body
        and nothing after it. Anything else is left to the general path (None),
        which then reads the same bytes from the start."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self._max_head:
            return None
        head = data[:end]
        parsed = _HEADS.get(head)
        if parsed is None:
            parsed = _usual_head(head)
            if parsed is None:
                return None
            if end <= CACHED_HEAD_BYTES:
                if len(_HEADS) >= _HEADS_MAX:
                    _HEADS.clear()
                _HEADS[head] = parsed
        status, headers, length, keep_alive = parsed
        body = data[end + 4 :]
        if length != len(body) or (self._max_body and length > self._max_body):
            return None
        self._frame = _Frame.LENGTH
        self._status, self._headers, self._head_used = status, headers, end + 4
        self._result = RawResponse(status, headers, body, False, keep_alive, end + 4)
        return self._result

    def _head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            if len(self._buf) > self._max_head:
                raise HeadTooBig(f"response headers are over {self._max_head} bytes")
            self._scanned = len(self._buf)
            return False
        self._scanned = 0
        self._head_used = end + 4
        if self._head_used > self._max_head:
            raise HeadTooBig(f"response headers are over {self._max_head} bytes ({end + 4})")
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise MalformedResponse(f"bad status line {lines[0][:80]!r}")
        status = int(match[2])
        if status < 200:  # an interim answer (100 Continue): the real one follows
            return True
        headers = tuple(_header(line) for line in lines[1:])
        self._status, self._headers = status, headers
        self._keep_alive = match[1] == b"1"
        self._frame = self._framing(headers)
        if self._frame == _Frame.LENGTH and self._left == 0:
            self._done()
        return True

    def _framing(self, headers: tuple[tuple[str, str], ...]) -> int:
        lengths: set[str] = set()
        codings: list[str] = []
        for name, value in headers:
            key = name.lower()
            if key == "content-length":
                lengths.update(v.strip(" \t") for v in value.split(","))
            elif key == "transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(",") if c.strip())
            elif key == "connection":
                self._connection_header(value)
        if self._status in (204, 304):
            self._left = 0
            return _Frame.LENGTH
        if codings:
            # With both, the coding wins, but the connection is not to be trusted after.
            self._keep_alive = self._keep_alive and not lengths and codings[-1] == "chunked"
            return _Frame.CHUNK_SIZE if codings[-1] == "chunked" else _Frame.UNTIL_EOF
        if not lengths:
            self._keep_alive = False
            return _Frame.UNTIL_EOF
        if len(lengths) != 1 or not _digits(value := lengths.pop()):
            raise MalformedResponse("bad Content-Length")
        self._left = int(value)
        return _Frame.LENGTH

    def _connection_header(self, value: str) -> None:
        self._keep_alive = _connection_says(value, self._keep_alive)

    # --------------------------------------------------------------- body

    def _take(self, data: bytes | bytearray) -> None:
        if data and (self._max_body == 0 or self._body_size <= self._max_body):
            self._body += data
        self._body_size += len(data)

    def _take_counted(self) -> bool:
        """Take what has arrived of a counted part (a Content-Length body or a chunk)."""
        n = min(self._left, len(self._buf))
        if n:
            self._take(self._buf[:n])
            del self._buf[:n]
            self._left -= n
        if self._left:
            return False
        if self._frame == _Frame.CHUNK_DATA:
            self._frame = _Frame.CHUNK_END
        else:
            self._done()
        return True

    def _until_eof(self) -> bool:
        self._take(self._buf)
        self._buf.clear()
        return False

    def _chunk_size(self) -> bool:
        line = self._line(_MAX_CHUNK_LINE)
        if line is None:
            return False
        size = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size):
            raise MalformedResponse(f"bad chunk size {line[:40]!r}")
        self._left = int(size, 16)
        self._frame = _Frame.CHUNK_DATA if self._left else _Frame.TRAILER
        return True

    def _chunk_end(self) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] != b"\r\n":
            raise MalformedResponse("a chunk does not end with CRLF")
        del self._buf[:2]
        self._frame = _Frame.CHUNK_SIZE
        return True

    def _trailer(self) -> bool:
        """Trailer lines (ignored) until an empty one."""
        line = self._line(self._max_head - self._head_used)
        if line is None:
            return False
        if not line:
            self._done()
        return True

    def _line(self, limit: int) -> bytes | None:
        """The next line, once it has come; HeadTooBig if it takes more than ``limit``
        bytes with its CRLF, whether it came in one read or byte by byte."""
        end = self._buf.find(b"\r\n", max(0, self._scanned - 1))
        if end < 0 and len(self._buf) <= limit:
            self._scanned = len(self._buf)
            return None
        self._scanned = 0
        if end < 0 or end + 2 > limit:
            if self._frame == _Frame.TRAILER:
                raise HeadTooBig(f"response headers are over {self._max_head} bytes")
            raise HeadTooBig("a chunk line is too long")
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if self._frame == _Frame.TRAILER:
            self._head_used += end + 2
        return line

    def _done(self, truncated: bool = False) -> RawResponse:
        truncated = truncated or self._body_size > self._max_body > 0
        if truncated:
            del self._body[self._max_body :]
        body = bytes(self._body)
        self._result = RawResponse(
            status=self._status,
            headers=self._headers,
            body=body,
            truncated=truncated,
            # Bytes past the response mean the peer does not follow one request, one answer.
            keep_alive=self._keep_alive and not truncated and not self._buf,
            head_bytes=self._head_used,
        )
        return self._result


_Head = tuple[int, tuple[tuple[str, str], ...], int, bool]  # status, headers, length, keep-alive
# The heads of usual answers already parsed. A function answers with the same head
# call after call (its Date changes once a second): a lookup instead of a parse.
_HEADS: dict[bytes, _Head] = {}
_HEADS_MAX = 256


def _usual_head(head: bytes) -> _Head | None:
    """A head that ``_whole`` can take (a final status with a body, a valid
    Content-Length, no Transfer-Encoding), parsed; None for anything else."""
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        return None
    status = int(match[2])
    if status < 200 or status in {204, 304}:
        return None
    keep_alive = match[1] == b"1"
    length = -1
    headers = []
    for line in lines[1:]:
        name, value = _header(line)
        headers.append((name, value))
        key = _lower(name)
        if key == "content-length":
            if length >= 0 or not _digits(value):
                return None
            length = int(value)
        elif key == "transfer-encoding":
            return None
        elif key == "connection":
            keep_alive = _connection_says(value, keep_alive)
    if length < 0:
        return None
    return status, tuple(headers), length, keep_alive


_NAMES: dict[bytes, str] = {}  # header names seen and found valid (a few dozen at most)
_NAMES_MAX = 512
_LOWER: dict[str, str] = {}


def _header(line: bytes) -> tuple[str, str]:
    raw, sep, value = line.partition(b":")
    name = _NAMES.get(raw) if sep else None
    if name is None:
        if not sep or not _TOKEN.fullmatch(raw):
            raise MalformedResponse(f"bad header line {line[:80]!r}")
        name = raw.decode("ascii")
        if len(_NAMES) < _NAMES_MAX and len(raw) <= CACHED_NAME_BYTES:
            _NAMES[raw] = name
    return name, value.strip(b" \t").decode("utf-8", "replace")


def _digits(value: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' (int() refuses it) and '٣'."""
    return value.isascii() and value.isdigit()


def _tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(","))


_cached_tokens = functools.lru_cache(maxsize=64)(_tokens)


def _connection_says(value: str, keep_alive: bool) -> bool:
    """Whether a ``Connection`` header leaves the connection open (else as it was)."""
    tokens = _cached_tokens(value) if len(value) <= CACHED_NAME_BYTES else _tokens(value)
    if "close" in tokens:
        return False
    return True if "keep-alive" in tokens else keep_alive


def _lower(name: str) -> str:
    key = _LOWER.get(name)
    if key is None:
        key = name.lower()
        if len(_LOWER) < _NAMES_MAX and len(name) <= CACHED_NAME_BYTES:
            _LOWER[name] = key
    return key
