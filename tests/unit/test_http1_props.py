"""Properties of the function-socket response parser, on generated responses."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker.agent.http1 import (
    HeadTooBig,
    Incomplete,
    MalformedResponse,
    ParseError,
    RawResponse,
    ResponseParser,
)

TOKEN = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
FRAMING = {"content-length", "transfer-encoding", "connection"}
# What a field value may hold: tab, space, visible ASCII and any byte past it.
VALUE_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
NO_BODY = (204, 304)


@dataclass(frozen=True)
class Sample:
    """A response's bytes and what parsing them must give."""

    data: bytes
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    keep_alive: bool
    head_bytes: int  # the final head, plus the chunked trailer block
    final_head: int  # the final head alone
    body_start: int  # where the body's bytes begin in data
    framing: str  # "length", "chunked" or "eof"
    interim: tuple[int, ...]  # sizes of the 1xx heads before the final one

    def expected(self, max_body: int = 0) -> RawResponse:
        if max_body and len(self.body) > max_body:
            return RawResponse(
                self.status, self.headers, self.body[:max_body], True, False, self.final_head
            )
        return RawResponse(
            self.status, self.headers, self.body, False, self.keep_alive, self.head_bytes
        )


names = st.text(TOKEN, min_size=1, max_size=12).filter(lambda n: n.lower() not in FRAMING)
values = st.lists(st.sampled_from(VALUE_BYTES), max_size=24).map(bytes)
# Short bodies, and a share of longer ones (a few KB) that small draws would not reach.
bodies = st.binary(max_size=64) | st.integers(64, 3000).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)
)
reasons = st.sampled_from([b"", b" ", b" OK", b"\tfine", b" Not Found", b" \xc3\xa9t\xc3\xa9"])


def status_line(version: bytes, status: int, reason: bytes) -> bytes:
    return b"HTTP/1.%s %d%s\r\n" % (version, status, reason)


def header_text(value: bytes) -> str:
    return value.strip(b" \t").decode("utf-8", "replace")


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> tuple[bytes, int]:
    """The chunked encoding of ``body`` and the size of its trailer block."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=6)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    out = bytearray()
    for part in (p for p in parts if p):
        size = b"%x" % len(part)
        size = draw(st.sampled_from([size, size.upper(), b"00" + size]))
        ext = draw(st.sampled_from([b"", b";x=1", b' ;name="v v"', b";a;b=c"]))
        out += size + ext + b"\r\n" + part + b"\r\n"
    out += b"0" + draw(st.sampled_from([b"", b";last"])) + b"\r\n"
    trailers = draw(st.lists(st.tuples(names, values), max_size=3))
    block = b"".join(n.encode() + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    return bytes(out + block), len(block)


@st.composite
def responses(draw: st.DrawFn, framings: tuple[str, ...] = ("length", "chunked", "eof")) -> Sample:
    version = draw(st.sampled_from([b"0", b"1"]))
    interim = b"".join(
        status_line(b"1", code, b" Continue") + b"\r\n"
        for code in draw(st.lists(st.integers(100, 199), max_size=2))
    )
    status = draw(st.integers(200, 599))
    framing = draw(st.sampled_from(framings))
    body = b"" if status in NO_BODY else draw(bodies)
    headers = draw(st.lists(st.tuples(names, values), max_size=8))
    keep_alive = version == b"1"
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive", b"x, close"]))
    if connection is not None:
        headers.insert(draw(st.integers(0, len(headers))), ("Connection", connection))
        keep_alive = b"close" not in connection
    encoded, trailer_bytes = body, 0
    if framing == "length":
        length = b"%d" % len(body)
        headers.insert(draw(st.integers(0, len(headers))), ("Content-Length", length))
    elif framing == "chunked":
        headers.insert(draw(st.integers(0, len(headers))), ("Transfer-Encoding", b"chunked"))
        if status not in NO_BODY:
            encoded, trailer_bytes = draw(chunked(body))
    elif status not in NO_BODY:
        keep_alive = False  # the body runs until the connection closes
    head = status_line(version, status, draw(reasons))
    head += b"".join(n.encode() + b":" + v + b"\r\n" for n, v in headers) + b"\r\n"
    return Sample(
        data=interim + head + encoded,
        status=status,
        headers=tuple((n, header_text(v)) for n, v in headers),
        body=body,
        keep_alive=keep_alive,
        head_bytes=len(head) + trailer_bytes,
        final_head=len(head),
        body_start=len(interim) + len(head),
        framing="length" if status in NO_BODY else framing,
        interim=tuple(len(h) + 4 for h in interim.split(b"\r\n\r\n")[:-1]),
    )


splits = st.lists(st.integers(0, 1 << 16), max_size=12)


def pieces(data: bytes, cuts: list[int] | None) -> list[bytes]:
    """``data`` cut where ``cuts`` say (modulo its length); None: one byte at a time."""
    if cuts is None:
        return [data[i : i + 1] for i in range(len(data))]
    at = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at)]


def run(parser: ResponseParser, parts: list[bytes], eof: bool = True) -> RawResponse:
    """Feed ``parts`` until a response comes; then the connection closes."""
    for part in parts:
        r = parser.feed(part)
        if r is not None:
            return r
    assert eof, "the whole response was fed, yet nothing came out"
    return parser.feed_eof()


def parse_all_ways(
    sample: Sample, cuts: list[int], *, max_header: int = 1 << 20, max_body: int = 0
) -> list[RawResponse]:
    eof = sample.framing == "eof"
    return [
        run(ResponseParser(max_header, max_body), parts, eof)
        for parts in ([sample.data], pieces(sample.data, None), pieces(sample.data, cuts))
    ]


@settings(max_examples=300)
@given(responses(), splits)
def test_a_response_parses_the_same_however_it_is_cut(sample: Sample, cuts: list[int]) -> None:
    for r in parse_all_ways(sample, cuts):
        assert r == sample.expected()


@settings(max_examples=200)
@given(responses(), splits, st.integers(1, 3100))
def test_the_body_limit_cuts_at_exactly_the_limit(
    sample: Sample, cuts: list[int], max_body: int
) -> None:
    for r in parse_all_ways(sample, cuts, max_body=max_body):
        assert r == sample.expected(max_body)
        assert len(r.body) <= max_body
        assert r.truncated == (len(sample.body) > max_body)


@settings(max_examples=200)
@given(responses(), splits)
def test_the_header_limit_counts_the_head_and_the_trailers(sample: Sample, cuts: list[int]) -> None:
    assume(all(size < sample.head_bytes for size in sample.interim))
    for r in parse_all_ways(sample, cuts, max_header=sample.head_bytes):
        assert r == sample.expected()
    for parts in ([sample.data], pieces(sample.data, None), pieces(sample.data, cuts)):
        with pytest.raises(HeadTooBig):
            run(ResponseParser(sample.head_bytes - 1), parts)


@settings(max_examples=200)
@given(responses(), st.integers(0, 1 << 16), splits)
def test_a_response_cut_short_is_incomplete(sample: Sample, end: int, cuts: list[int]) -> None:
    """Closed before its end, a response is Incomplete, but for a body that runs until
    the close: that is whatever of it came."""
    cut = sample.data[: end % len(sample.data)]
    parser = ResponseParser(1 << 20)
    for part in pieces(cut, cuts):
        assert parser.feed(part) is None
    if sample.framing == "eof" and len(cut) >= sample.body_start:
        assert parser.expects_eof
        r = parser.feed_eof()
        assert r == RawResponse(
            sample.status, sample.headers, cut[sample.body_start :], False, False,
            sample.final_head,
        )  # fmt: skip
    else:
        assert not parser.expects_eof
        with pytest.raises(Incomplete):
            parser.feed_eof()


def outcome(data: bytes, cuts: list[int] | None, max_header: int, max_body: int) -> None:
    """Parse ``data`` as cut; anything but a response or a ParseError fails the test."""
    parser = ResponseParser(max_header, max_body)
    try:
        for part in pieces(data, cuts):
            if parser.feed(part) is not None:
                return
        parser.feed_eof()
    except ParseError:
        pass


limits = st.tuples(st.integers(0, 600), st.integers(0, 50))


@settings(max_examples=600)
@given(st.binary(max_size=600), st.one_of(st.none(), splits), limits)
def test_any_bytes_give_a_response_or_a_parse_error(
    data: bytes, cuts: list[int] | None, limit: tuple[int, int]
) -> None:
    outcome(data, cuts, *limit)


near_http = st.lists(
    st.sampled_from([b"HTTP/1.1 ", b"200", b"100", b"\r\n", b": ", b"0\r\n", b"5", b"chunked"])
    | st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Connection"])
    | st.binary(max_size=8),
    max_size=30,
).map(b"".join)


@settings(max_examples=600)
@given(near_http, st.one_of(st.none(), splits), limits)
def test_bytes_near_http_give_a_response_or_a_parse_error(
    data: bytes, cuts: list[int] | None, limit: tuple[int, int]
) -> None:
    outcome(b"HTTP/1.1 200 OK\r\n" + data, cuts, *limit)


edits = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.integers(0, 8), st.binary(max_size=8)), max_size=4
)


@settings(max_examples=250)
@given(responses(), edits, st.one_of(st.none(), splits), st.integers(0, 100))
def test_a_corrupted_response_gives_a_response_or_a_parse_error(
    sample: Sample,
    changes: list[tuple[int, int, bytes]],
    cuts: list[int] | None,
    max_body: int,
) -> None:
    data = sample.data
    for where, drop, new in changes:  # replace drop bytes at where with new
        at = where % (len(data) + 1)
        data = data[:at] + new + data[at + drop :]
    outcome(data, cuts, 1 << 16, max_body)


# Content-Length values from digits of any script, signs, commas and spaces.
odd_lengths = st.text(
    st.characters(categories=["Nd", "No", "Zs"]) | st.sampled_from("0123456789+-,; \t"),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300)
@given(odd_lengths, st.binary(max_size=12), st.booleans())
def test_a_content_length_is_ascii_digits_or_malformed(
    value: str, body: bytes, one_read: bool
) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: " + value.encode() + b"\r\n\r\n" + body
    lengths = {v.strip(" \t") for v in value.strip(" \t").split(",")}
    if len(lengths) != 1 or not all(v.isascii() and v.isdigit() for v in lengths):
        with pytest.raises(MalformedResponse):
            ResponseParser(1024).feed(data)
        return
    n = int(lengths.pop())
    parser = ResponseParser(1024)
    if len(body) < n:
        with pytest.raises(Incomplete):
            run(parser, [data] if one_read else pieces(data, None))
        return
    r = run(parser, [data] if one_read else pieces(data, None), eof=False)
    # Bytes past the body in the same read end keep-alive; byte by byte, none are.
    assert (r.body, r.keep_alive) == (body[:n], len(body) == n or not one_read)


@settings(max_examples=100)
@given(st.integers(0, 5000), st.binary(min_size=1, max_size=64), splits)
def test_a_chunk_line_over_its_limit_is_refused_however_it_is_cut(
    ext: int, body: bytes, cuts: list[int]
) -> None:
    """A chunk-size line (extensions and all) takes at most 4096 bytes with its CRLF."""
    line = b"%x;" % len(body) + b"e" * ext
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = head + line + b"\r\n" + body + b"\r\n0\r\n\r\n"
    for parts in ([data], pieces(data, None), pieces(data, cuts)):
        if len(line) + 2 > 4096:
            with pytest.raises(HeadTooBig):
                run(ResponseParser(1024), parts)
        else:
            assert run(ResponseParser(1024), parts, eof=False).body == body
