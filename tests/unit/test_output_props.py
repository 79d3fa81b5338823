"""Properties of a call's log capture: LogBuffer, and OutputRouter feeding it."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.drivers.output import OutputRouter
from worker.agent.drivers.stdio import MARK_PREFIX, STREAMS, ProcessStdio
from worker.agent.logbuf import LogBuffer, truncation_marker

# Output with NULs, newlines and pieces of the marker's prefix, never all of it (that
# is taken as a marker by design).
outputs = (
    st.lists(
        st.binary(max_size=40)
        | st.sampled_from([b"\x00", b"\n", b"\r\n", MARK_PREFIX[:4], MARK_PREFIX[:-1]]),
        max_size=12,
    )
    .map(b"".join)
    .filter(lambda data: MARK_PREFIX not in data)
)
splits = st.lists(st.integers(0, 1 << 16), max_size=10)
caps = st.integers(0, 300)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    at = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at) if b > a]


def capped(data: bytes, cap: int) -> bytes:
    return data if len(data) <= cap else data[:cap] + truncation_marker(cap)


@settings(max_examples=300)
@given(outputs, splits, caps)
def test_a_log_buffer_keeps_the_same_bytes_however_they_are_written(
    data: bytes, cuts: list[int], cap: int
) -> None:
    buffer = LogBuffer(cap)
    for part in pieces(data, cuts):
        buffer.write(part)
    assert buffer.getvalue() == capped(data, cap)
    assert len(buffer) == min(len(data), cap)
    assert buffer.truncated == (len(data) > cap)
    assert buffer.dropped_bytes == max(0, len(data) - cap)


class Stdio(ProcessStdio):
    """Takes the marker line without writing it: the test feeds it where it wants."""

    def __init__(self) -> None:
        super().__init__(pid=0)
        self.line = b""

    def write(self, data: bytes) -> tuple[int, ...]:
        self.line = data
        return STREAMS


Plan = Callable[[bytes], list[tuple[int, bytes]]]


def capture(plan: Plan, cap: int) -> tuple[bytes, bytes]:
    """The logs of a call and of the next one, the output fed as ``plan`` says given
    the first call's marker line: (stream, piece) in order."""

    async def run() -> tuple[bytes, bytes]:
        router = OutputRouter(None, "t")
        first, second = LogBuffer(cap), LogBuffer(cap)
        segment = router.open(first.write)
        stdio = Stdio()
        assert router.seal(segment, stdio, limit_s=60.0)
        router.open(second.write)  # the next call, before the markers are through
        for stream, piece in plan(stdio.line):
            router.feed(stream, piece)
        assert segment.sealed.done()
        router.end()
        return first.getvalue(), second.getvalue()

    return asyncio.run(run())


streams = st.fixed_dictionaries({s: outputs for s in STREAMS})
stream_cuts = st.fixed_dictionaries({s: splits for s in STREAMS})


@settings(max_examples=200)
@given(outputs, outputs, st.sampled_from(STREAMS), stream_cuts, caps)
def test_a_call_gets_its_output_however_it_is_cut(
    before: bytes, after: bytes, stream: int, cuts: dict[int, list[int]], cap: int
) -> None:
    """Output on one stream, the markers on both, all cut anywhere: the call gets what
    came before its marker, the next one what came after, each capped once. (Across
    streams, order is not kept: a piece that may begin a marker waits for the next.)"""

    def plan(line: bytes) -> list[tuple[int, bytes]]:
        out = {s: line for s in STREAMS} | {stream: before + line + after}
        return [(s, p) for s in STREAMS for p in pieces(out[s], cuts[s])]

    first, second = capture(plan, cap)
    assert first == capped(before, cap)
    assert second == capped(after, cap)


@settings(max_examples=200)
@given(streams, streams, stream_cuts, caps, st.data())
def test_interleaved_streams_lose_and_repeat_nothing(
    before: dict[int, bytes],
    after: dict[int, bytes],
    cuts: dict[int, list[int]],
    cap: int,
    data: st.DataObject,
) -> None:
    """The two streams' pieces in any order (each stream's own in order): a call's log
    holds its bytes, capped, and one marker at most, at the end."""

    def plan(line: bytes) -> list[tuple[int, bytes]]:
        per = {s: pieces(before[s] + line + after[s], cuts[s]) for s in STREAMS}
        picks = data.draw(st.permutations([s for s in STREAMS for _ in per[s]]))
        taken = {s: iter(per[s]) for s in STREAMS}
        return [(s, next(taken[s])) for s in picks]

    for log, out in zip(capture(plan, cap), (before, after), strict=True):
        total = out[1] + out[2]
        marker = truncation_marker(cap)
        body = log.removesuffix(marker) if len(total) > cap else log
        assert len(body) == min(len(total), cap)
        assert log.count(marker) == total.count(marker) + (len(total) > cap)
        if len(total) <= cap:  # both streams' bytes, merged
            assert sorted(body) == sorted(total)


@settings(max_examples=200)
@given(outputs, splits)
def test_output_between_calls_is_logged_line_by_line_however_it_is_cut(
    data: bytes, cuts: list[int]
) -> None:
    """Outside any call, output goes to the debug log one record per line (lines
    shorter than the 16 KiB cut), the last one when the stream ends."""
    logger = logging.getLogger("fnq.test.output-props")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:

        async def run() -> None:
            router = OutputRouter(logger, "t")
            for part in pieces(data, cuts):
                router.feed(1, part)
            router.end()

        asyncio.run(run())
    finally:
        logger.removeHandler(handler)
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()
    assert records == ["t: " + line.decode("utf-8", "replace").rstrip("\r") for line in lines]
