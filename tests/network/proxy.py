"""A TCP proxy for tests: a slow link, or one that goes silent.

Each chunk read on one side is written to the other ``delay_s`` after it was
read, in order, in both directions: a link with that latency each way (its
bandwidth is not limited). ``stall()`` stops forwarding without closing
anything, as a peer that went silent: what is sent meanwhile is read and kept,
and delivered (late) after ``resume()``. Unlike packets dropped by a firewall,
the proxy's kernel still acknowledges what it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class SlowLink:
    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.bytes = 0  # forwarded so far, both ways
        self.chunks = 0  # chunks forwarded so far, both ways

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str = "127.0.0.1") -> SlowLink:
        self._server = await asyncio.start_server(self._accept, host, 0)
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward ``reader`` to ``writer``, each chunk ``delay_s`` late."""
        loop = asyncio.get_running_loop()
        chunks: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        ended = False

        async def read() -> None:
            nonlocal ended
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    chunks.append((loop.time() + self.delay_s, data))
                    arrived.set()
            ended = True
            arrived.set()

        reading = asyncio.ensure_future(read())
        try:
            while True:
                while not chunks:
                    if ended:
                        return
                    arrived.clear()
                    await arrived.wait()
                due, data = chunks.popleft()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(data)
                self.bytes += len(data)
                self.chunks += 1
                await writer.drain()
        except OSError:
            return
        finally:
            reading.cancel()
            writer.close()
            self._writers.discard(writer)
