"""What the hot path costs, measured on the real engine (printed with -s; bounds are loose)."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from tests.docker.conftest import request, spec
from worker.agent.drivers.docker import DockerDriver

pytestmark = pytest.mark.integration

CALLS = 300


async def raw_call_ms(socket_path: str, calls: int) -> float:
    """Mean latency of a minimal hand-written HTTP/1.1 client on the same socket."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    message = (
        b"POST /call HTTP/1.1\r\nHost: localhost\r\nFn-Call-Id: raw\r\n"
        b"Fn-Deadline: 2099-01-01T00:00:00Z\r\nContent-Length: 2\r\n\r\nhi"
    )
    try:
        started = time.perf_counter()
        for _ in range(calls):
            writer.write(message)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        return (time.perf_counter() - started) * 1000 / calls
    finally:
        writer.close()


async def test_hot_path_costs(driver: DockerDriver) -> None:
    t0 = time.perf_counter()
    c = await driver.create(spec("fnq/echo"))
    t1 = time.perf_counter()
    await c.start()
    t2 = time.perf_counter()
    try:
        for _ in range(20):  # warm up both ends
            await c.dispatch(request(b"hi"))
        started = time.perf_counter()
        for _ in range(CALLS):
            await c.dispatch(request(b"hi"))
        dispatch_ms = (time.perf_counter() - started) * 1000 / CALLS
        raw_ms = await raw_call_ms(str(c.iofs.socket_path), CALLS)
        pauses, thaws = [], []
        for _ in range(5):
            p0 = time.perf_counter()
            await c.pause()
            p1 = time.perf_counter()
            await c.unpause()
            await c.dispatch(request(b"hi"))
            p2 = time.perf_counter()
            pauses.append((p1 - p0) * 1000)
            thaws.append((p2 - p1) * 1000)
    finally:
        await c.remove()
    print(
        f"\ncreate {1000 * (t1 - t0):.0f} ms, start until ready {1000 * (t2 - t1):.0f} ms; "
        f"hot dispatch {dispatch_ms:.2f} ms vs raw client {raw_ms:.2f} ms; "
        f"pause {statistics.median(pauses):.1f} ms; "
        f"unpause + first call {statistics.median(thaws):.1f} ms"
    )
    assert dispatch_ms - raw_ms < 10.0
    assert statistics.median(thaws) < 500
