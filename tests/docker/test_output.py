"""OutputRouter: routing, markers cut anywhere, the quiet-time fallback (no docker needed)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from worker.agent.drivers.output import OutputRouter
from worker.agent.drivers.stdio import ProcessStdio, new_marker


class FakeStdio(ProcessStdio):
    """Writes markers into the router itself, after ``delay_s``, cut into ``pieces``."""

    def __init__(self, router: OutputRouter, pieces: int = 1, delay_s: float = 0.0) -> None:
        super().__init__(pid=0)
        self.router, self.pieces, self.delay_s = router, pieces, delay_s

    def write(self, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        for stream in (1, 2):
            step = max(1, len(data) // self.pieces)
            for i in range(0, len(data), step):
                loop.call_later(self.delay_s, self.router.feed, stream, data[i : i + step])
        return 2


@pytest.mark.parametrize("pieces", [1, 2, 5, 27])
async def test_markers_are_removed_and_release_the_barrier(pieces: int) -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    router.set_sink(got.append)
    router.feed(2, b"before\n")
    assert await router.barrier(FakeStdio(router, pieces), limit_s=1.0)
    router.feed(2, b"after\n")
    assert b"".join(got) == b"before\nafter\n"


async def test_user_nul_bytes_pass_through() -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    router.set_sink(got.append)
    router.feed(1, b"a\x00b\x00")
    router.feed(1, b"\x00fnq-not-a-mark\n")
    router.end()
    assert b"".join(got) == b"a\x00b\x00\x00fnq-not-a-mark\n"


async def test_a_lost_marker_times_out_and_a_late_one_is_still_removed() -> None:
    router = OutputRouter(None, "t")
    got: list[bytes] = []
    router.set_sink(got.append)
    assert not await router.barrier(FakeStdio(router, delay_s=0.2), limit_s=0.01)
    _, line = new_marker()
    router.feed(1, b"x" + line + b"y")
    await asyncio.sleep(0.3)
    assert b"".join(got) == b"xy"


async def test_no_stdio_means_no_barrier_and_quiet_time_ends_when_idle() -> None:
    router = OutputRouter(None, "t")
    assert not await router.barrier(None, limit_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await router.settle(quiet_s=0.01, limit_s=1.0)
    assert 0.009 <= loop.time() - started < 0.5


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
