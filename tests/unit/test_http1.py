"""The function-socket response parser, fed whole and byte by byte."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from worker.agent import fdk, http1
from worker.agent.http1 import (
    HeadTooBig,
    Incomplete,
    MalformedResponse,
    RawResponse,
    ResponseParser,
)

FDK_ANSWER = (
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: 75\r\n"
    b"content-type: application/json\r\nfn-fdk-version: fdk-python/0.1.128\r\n"
    b"content-length: 28\r\n\r\n"
    b'{"message": "Hello, bench!"}'
)


def parse(data: bytes, *, max_header: int = 65536, max_body: int = 0) -> RawResponse:
    """Feed ``data`` at once, and again one byte at a time; both must agree."""
    whole = ResponseParser(max_header, max_body).feed(data)
    parser = ResponseParser(max_header, max_body)
    drip = None
    for i in range(len(data)):
        drip = parser.feed(data[i : i + 1])
        if drip is not None:
            break
    assert whole is not None and whole == drip
    return whole


def test_fdk_answer() -> None:
    r = parse(FDK_ANSWER)
    assert r.status == 200 and r.keep_alive and not r.truncated
    assert r.body == b'{"message": "Hello, bench!"}'
    assert ("content-type", "application/json") in r.headers


def test_chunked_body_with_extensions_and_trailers() -> None:
    data = (
        b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    r = parse(data)
    assert (r.status, r.body, r.keep_alive) == (502, b"hello world", True)


def test_interim_answers_are_skipped() -> None:
    r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert (r.status, r.body) == (200, b"ok")


def test_no_body_statuses_and_empty_length() -> None:
    assert parse(b"HTTP/1.1 204 No Content\r\n\r\n").body == b""
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").body == b""


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n", True),
    ],
)
def test_keep_alive_follows_version_and_connection_header(head: bytes, keep: bool) -> None:
    assert parse(head + b"x").keep_alive is keep


def test_body_until_the_connection_closes() -> None:
    parser = ResponseParser(1024)
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome ") is None
    assert parser.feed(b"bytes") is None
    assert parser.expects_eof
    r = parser.feed_eof()
    assert (r.body, r.keep_alive) == (b"some bytes", False)


def test_body_over_the_limit_is_cut_and_the_connection_given_up() -> None:
    parser = ResponseParser(1024, 10)
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12345") is None
    r = parser.feed(b"67890abcdef")  # returned at once: the other 84 bytes are never read
    assert r is not None and r.truncated and not r.keep_alive
    assert r.body == b"1234567890"
    exact = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n1234567890", max_body=10)
    assert not exact.truncated and exact.keep_alive


def test_chunked_body_over_the_limit() -> None:
    r = ResponseParser(1024, 4).feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n"
    )
    assert r is not None and r.truncated and r.body == b"abcd"
    whole = ResponseParser(1024, 4).feed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    )
    assert whole is not None and whole.truncated and whole.body == b"abcd" and not whole.keep_alive
    at_once = ResponseParser(1024, 4).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabcdef")
    assert at_once is not None and at_once.truncated and at_once.body == b"abcd"


def test_a_body_over_the_limit_ends_the_parse_however_it_arrives() -> None:
    """What follows the byte over the limit is not parsed: neither its trailers
    (head_bytes) nor a bad chunk in it (no MalformedResponse when it came in one read)."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    r = parse(head + b"3\r\nabc\r\n3\r\ndef\r\n0\r\nX-T: 1\r\n\r\n", max_body=4)
    assert (r.body, r.truncated, r.keep_alive, r.head_bytes) == (b"abcd", True, False, len(head))
    assert parse(head + b"3\r\nabc\r\n3\r\ndef\r\nzz\r\n", max_body=4) == r


def test_a_body_of_tiny_chunks_takes_memory_in_proportion_to_its_size() -> None:
    """A byte per chunk: the parser's memory is the body's, not an object per chunk."""
    n = 200_000
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nc\r\n" * n
    pieces = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    parser = ResponseParser(1024, n)
    tracemalloc.start()
    try:
        for piece in pieces:
            assert parser.feed(piece) is None
        r = parser.feed(b"0\r\n\r\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r is not None and r.body == b"c" * n and not r.truncated
    assert peak < 4 * n, peak  # a list of one-byte objects took over 50 bytes a chunk


def test_header_block_over_the_limit() -> None:
    fat = b"HTTP/1.1 200 OK\r\nX-Fat: " + b"f" * 2000 + b"\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(HeadTooBig):
        ResponseParser(1024).feed(fat)
    with pytest.raises(HeadTooBig):  # also before the end of the block has arrived
        ResponseParser(1024).feed(fat[:1500])


def test_a_chunk_line_is_limited_however_it_arrives() -> None:
    """4096 bytes with its CRLF, in one read as byte by byte."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for line, ok in ((b"1;" + b"e" * 4092, True), (b"1;" + b"e" * 4093, False)):
        data = head + line + b"\r\n" + b"x\r\n0\r\n\r\n"
        if ok:
            assert parse(data).body == b"x"
            continue
        with pytest.raises(HeadTooBig, match="chunk line"):
            ResponseParser(1024).feed(data)
        parser = ResponseParser(1024)
        with pytest.raises(HeadTooBig, match="chunk line"):
            for i in range(len(data)):
                parser.feed(data[i : i + 1])


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        "HTTP/1.1 200 OK\r\nContent-Length: ²\r\n\r\nxx".encode(),  # int() refuses it
        "HTTP/1.1 200 OK\r\nContent-Length: ٢\r\n\r\nxx".encode(),  # int() takes it as 2
        "HTTP/1.1 200 OK\r\nContent-Length: 2\u3000\r\n\r\nxx".encode(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
    ],
)
def test_malformed_answers(data: bytes) -> None:
    with pytest.raises(MalformedResponse):
        ResponseParser(1024).feed(data)
    parser = ResponseParser(1024)
    with pytest.raises(MalformedResponse):
        for i in range(len(data)):
            parser.feed(data[i : i + 1])


def test_connection_closed_early() -> None:
    with pytest.raises(Incomplete, match="without a response"):
        ResponseParser(1024).feed_eof()
    parser = ResponseParser(1024)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    with pytest.raises(Incomplete, match="before the response was complete"):
        parser.feed_eof()


def test_bytes_after_the_answer_end_keep_alive() -> None:
    r = ResponseParser(1024).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1")
    assert r is not None and r.body == b"x" and not r.keep_alive


def test_a_known_header_name_without_its_colon_is_still_malformed() -> None:
    parse(b"HTTP/1.1 200 OK\r\nX-Seen: 1\r\nContent-Length: 0\r\n\r\n")  # names now known
    for line in (b"X-Seen", b"Content-Length"):
        with pytest.raises(MalformedResponse):
            ResponseParser(1024).feed(b"HTTP/1.1 200 OK\r\n" + line + b"\r\n\r\n")


def test_an_answer_whole_in_one_read_matches_the_general_path() -> None:
    """The one-read path and the byte-by-byte one agree on what they both accept."""
    for data in (
        FDK_ANSWER,
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close, x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: 1\r\na: 2\r\nContent-Length: 1\r\n\r\nx",
    ):
        r = parse(data)
        assert r.head_bytes == data.index(b"\r\n\r\n") + 4
        assert r.keep_alive == (b"close" not in data and (b"1.1" in data[:9] or b"Keep" in data))


def test_a_head_seen_before_is_looked_up_and_still_checked() -> None:
    """A head parsed once is remembered; the body and limits are checked each time."""
    first = parse(FDK_ANSWER)
    head = FDK_ANSWER[: FDK_ANSWER.index(b"\r\n\r\n")]
    assert head in http1._HEADS
    assert parse(FDK_ANSWER) == first
    # The same head with a body of another length is not the usual answer: the
    # general path reads it (here: the body is still to come).
    parser = ResponseParser(65536)
    assert parser.feed(FDK_ANSWER[:-1]) is None
    assert parser.feed(FDK_ANSWER[-1:]) == first
    # The limits are the parser's own, not those of whoever parsed the head first.
    with pytest.raises(HeadTooBig):
        ResponseParser(len(head)).feed(FDK_ANSWER)
    cut = ResponseParser(65536, 5).feed(FDK_ANSWER)
    assert cut is not None and cut.truncated and cut.body == first.body[:5]


def test_remembered_heads_are_bounded() -> None:
    for i in range(http1._HEADS_MAX + 10):
        answer = b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 1\r\n\r\nx" % i
        assert ResponseParser(1024).feed(answer) is not None
        assert len(http1._HEADS) <= http1._HEADS_MAX


def test_what_a_function_sends_is_kept_past_its_answer_only_in_usual_sizes() -> None:
    """The caches of heads, names and tokens live as long as the worker: a function
    answering with long header names and values (new ones each call) must not fill
    them."""

    def answer(i: int) -> bytes:
        name = b"X-" + b"n" * 200_000 + b"%d" % i
        connection = b"keep-alive, " + b"t" * 200_000 + b"%d" % i
        return b"HTTP/1.1 200 OK\r\n%s: v\r\nConnection: %s\r\nContent-Length: 1\r\n\r\nx" % (
            name,
            connection,
        )

    answers = [answer(i) for i in range(5)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for data in answers:
            in_two = ResponseParser(1 << 20)  # the general path, not the one-read one
            assert in_two.feed(data[:10]) is None
            for r in (ResponseParser(1 << 20).feed(data), in_two.feed(data[10:])):
                assert r is not None and r.keep_alive
                name = r.headers[0][0]
                assert fdk.response_headers(r)[fdk.canonical_name(name)] == "v"
            del r, name, in_two
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 100_000, f"{kept} bytes kept after 5 answers of 400 KB heads"


def test_a_head_that_comes_a_few_bytes_at_a_time_costs_time_in_proportion_to_it() -> None:
    """Each read searches only what is new for the end of the head or of a trailer
    line: a function dripping a long head must not take the worker's CPU for
    seconds (searching the whole buffer on every read took about 15 s here)."""
    piece = b"a" * 16
    pieces = 1024 * 1024 // len(piece)  # 1 MiB
    started = time.perf_counter()
    for prefix, end in (
        (b"HTTP/1.1 200 OK\r\nX-Long: ", b"\r\nContent-Length: 0\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: ", b"\r\n\r\n"),
    ):
        parser = ResponseParser(4 * 1024 * 1024)
        assert parser.feed(prefix) is None
        for _ in range(pieces):
            assert parser.feed(piece) is None
        # The end split over two reads is still found.
        assert parser.feed(end[:-1]) is None
        r = parser.feed(end[-1:])
        assert r is not None and r.status == 200 and r.body == b""
    assert time.perf_counter() - started < 3.0
