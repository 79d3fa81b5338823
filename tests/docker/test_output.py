"""OutputRouter: segments, markers cut anywhere, overlap, the quiet-time fallback
(no docker needed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.agent.drivers.output import OutputRouter
from worker.agent.drivers.stdio import STREAMS, ProcessStdio, new_marker


class FakeStdio(ProcessStdio):
    """Writes markers into the router itself, after ``delay_s``, cut into ``pieces``."""

    def __init__(self, router: OutputRouter, pieces: int = 1, delay_s: float = 0.0) -> None:
        super().__init__(pid=0)
        self.router, self.pieces, self.delay_s = router, pieces, delay_s

    def write(self, data: bytes) -> tuple[int, ...]:
        loop = asyncio.get_running_loop()
        for stream in STREAMS:
            step = max(1, len(data) // self.pieces)
            for i in range(0, len(data), step):
                loop.call_later(self.delay_s, self.router.feed, stream, data[i : i + step])
        return STREAMS


@pytest.mark.parametrize("pieces", [1, 2, 5, 27])
async def test_markers_are_removed_and_seal_the_segment(pieces: int) -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    segment = router.open(got.append)
    router.feed(2, b"before\n")
    assert router.seal(segment, FakeStdio(router, pieces), limit_s=1.0)
    await asyncio.wait_for(segment.sealed, 1.0)
    after: list[bytes] = []
    router.open(after.append)
    router.feed(2, b"after\n")
    assert (b"".join(got), b"".join(after)) == (b"before\n", b"after\n")


async def test_the_next_call_may_start_before_the_last_one_is_sealed() -> None:
    # What comes before a call's marker on a stream is that call's, whenever it
    # arrives; the next call gets what follows the marker, stream by stream.
    router = OutputRouter(None, "t")
    first: list[bytes] = []
    second: list[bytes] = []
    one = router.open(first.append)
    router.feed(1, b"1a ")
    assert router.seal(one, FakeStdio(router, delay_s=0.05), limit_s=1.0)
    two = router.open(second.append)
    router.feed(1, b"1b ")  # still ahead of the first marker
    router.feed(2, b"1c ")
    await asyncio.wait_for(one.sealed, 1.0)
    router.feed(2, b"2a ")
    router.feed(1, b"2b ")
    assert not two.sealed.done()
    assert router.seal(two, FakeStdio(router), limit_s=1.0)
    await asyncio.wait_for(two.sealed, 1.0)
    assert b"".join(first) == b"1a 1b 1c "
    assert b"".join(second) == b"2a 2b "


async def test_user_nul_bytes_pass_through() -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    router.open(got.append)
    router.feed(1, b"a\x00b\x00")
    router.feed(1, b"\x00fnq-not-a-mark\n")
    router.end()
    assert b"".join(got) == b"a\x00b\x00\x00fnq-not-a-mark\n"


async def test_a_lost_marker_is_given_up_and_a_late_one_is_still_removed() -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    segment = router.open(got.append)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert router.seal(segment, FakeStdio(router, delay_s=0.2), limit_s=0.02)
    await asyncio.wait_for(segment.sealed, 1.0)
    assert loop.time() - started < 0.15
    later: list[bytes] = []
    router.open(later.append)
    _, line = new_marker()
    router.feed(1, b"x" + line + b"y")
    await asyncio.sleep(0.3)  # the real markers arrive now, and vanish
    assert got == [] and b"".join(later) == b"xy"


async def test_no_stdio_means_no_marker_and_quiet_time_ends_when_idle() -> None:
    router = OutputRouter(None, "t")
    segment = router.open(None)
    assert not router.seal(segment, None, limit_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await router.settle(quiet_s=0.01, limit_s=1.0)
    assert 0.009 <= loop.time() - started < 0.5
    router.drop(segment)
    assert segment.sealed.done()


async def test_the_end_of_the_stream_seals_everything() -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    one = router.open(got.append)
    router.seal(one, FakeStdio(router, delay_s=5.0), limit_s=10.0)
    two = router.open(got.append)
    router.feed(2, b"last words")
    router.end()
    assert one.sealed.done() and two.sealed.done()
    assert router.open(None).sealed.done()  # nothing more can come
    assert b"".join(got) == b"last words"


async def test_debug_log_gets_whole_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fnq.function")
    router = OutputRouter(logging.getLogger("fnq.function"), "app/fn c1")
    router.feed(2, b"one\ntw")
    router.feed(2, b"o\nthree")
    router.end()
    assert [r.getMessage() for r in caplog.records] == [
        "app/fn c1: one",
        "app/fn c1: two",
        "app/fn c1: three",
    ]
