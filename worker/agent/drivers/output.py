"""Where a container's stdout and stderr go, and how a call's log is closed exactly.

While a call runs, every chunk goes to that call's sink. Between calls, the
output goes to the ``fnq.function`` logger at DEBUG, one record per line
(nothing at all when FN_DISABLE_DEBUG_USER_LOGS is set).

The end of a call: the function's writes travel through the container
runtime and the engine and may reach the worker after its response. So
dispatch does not return before the output has caught up:

* ``barrier()`` (the normal case): a marker is written into the container's
  own stdout and stderr pipes (see drivers.stdio) and awaited on the attach
  stream. Everything the function wrote before it answered comes before the
  markers, so it is all in that call's log. Markers are removed from the
  output.
* ``settle()`` (when the pipes cannot be reached: the worker is not root, or
  the engine runs elsewhere, or a marker did not come back in time): wait
  until the stream has been quiet for ``quiet_s``, at most ``limit_s``. This
  is right whenever the engine delivers output within ``quiet_s``, which on
  a loaded host is not guaranteed.
"""

from __future__ import annotations

import asyncio
import logging

from worker.agent.driver import OutputSink
from worker.agent.drivers.stdio import MARK_BYTES, MARK_PREFIX, ProcessStdio, new_marker

_MAX_LINE_BYTES = 16 * 1024
_TAIL_BYTES = 2048


class OutputRouter:
    def __init__(self, logger: logging.Logger | None, label: str) -> None:
        self._logger = logger
        self._label = label
        self._sink: OutputSink | None = None
        self._partial = b""
        self._tail = b""
        self._last_chunk_s = 0.0
        self._ended = False
        self._sink_failed = False
        self._carry: dict[int, bytes] = {}  # per stream: a possible marker cut in two
        self._marks: dict[bytes, tuple[asyncio.Future[None], list[int]]] = {}

    @property
    def ended(self) -> bool:
        return self._ended

    def set_sink(self, sink: OutputSink | None) -> None:
        self._flush_partial()
        self._sink = sink

    def feed(self, stream: int, data: bytes) -> None:
        self._last_chunk_s = asyncio.get_running_loop().time()
        data = self._strip_marks(stream, data)
        if data:
            self._route(data)

    def end(self) -> None:
        for stream in list(self._carry):
            self._route(self._carry.pop(stream))
        self._flush_partial()
        self._ended = True
        for future, _ in self._marks.values():
            if not future.done():
                future.set_result(None)  # nothing more can come

    def tail(self, max_chars: int = 500) -> str:
        """The last output of the container, for error messages."""
        text = self._tail.decode("utf-8", "replace").strip()
        return text[-max_chars:]

    # ---------------------------------------------------------- end of call

    async def barrier(self, stdio: ProcessStdio | None, limit_s: float) -> bool:
        """Write a marker into the container's pipes and wait for it; False if not possible."""
        if self._ended:
            return True
        if stdio is None:
            return False
        token, line = new_marker()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = [0]
        self._marks[token] = (future, pending)
        try:
            pending[0] = stdio.write(line)
            if pending[0] == 0:
                return False
            async with asyncio.timeout(limit_s):
                await future
        except TimeoutError:
            return False
        finally:
            self._marks.pop(token, None)
        return True

    async def settle(self, quiet_s: float, limit_s: float) -> None:
        """Wait until no output arrived for ``quiet_s`` (see the module docstring)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + limit_s
        while not self._ended:
            now = loop.time()
            wait = max(start, self._last_chunk_s) + quiet_s - now
            if wait <= 0 or now >= deadline:
                return
            await asyncio.sleep(min(wait, deadline - now))

    # ------------------------------------------------------------ internals

    def _strip_marks(self, stream: int, data: bytes) -> bytes:
        carried = self._carry.pop(stream, b"")
        if carried:
            data = carried + data
        if b"\x00" not in data:
            return data
        kept: list[bytes] = []
        while (start := data.find(MARK_PREFIX)) >= 0:
            end = start + MARK_BYTES
            if len(data) < end:
                break
            kept.append(data[:start])
            self._mark_seen(data[start + len(MARK_PREFIX) : end - 1])
            data = data[end:]
        else:
            start = self._partial_prefix_at(data)
        if start >= 0:  # a marker begins here but is not complete yet
            self._carry[stream] = data[start:]
            data = data[:start]
        kept.append(data)
        return b"".join(kept)

    @staticmethod
    def _partial_prefix_at(data: bytes) -> int:
        """Where a proper prefix of the marker ends ``data``, or -1."""
        at = data.rfind(b"\x00", max(0, len(data) - len(MARK_PREFIX) + 1))
        return at if at >= 0 and MARK_PREFIX.startswith(data[at:]) else -1

    def _mark_seen(self, token: bytes) -> None:
        entry = self._marks.get(token)
        if entry is None:
            return  # a marker that arrived after its waiter gave up
        future, pending = entry
        pending[0] -= 1
        if pending[0] <= 0 and not future.done():
            future.set_result(None)

    def _route(self, data: bytes) -> None:
        self._tail = (self._tail + data)[-_TAIL_BYTES:]
        sink = self._sink
        if sink is not None:
            try:
                sink(data)
            except Exception:  # a faulty sink must not stop the container's output: log, go on
                if not self._sink_failed:
                    self._sink_failed = True
                    logging.getLogger(__name__).exception("output sink of %s failed", self._label)
            return
        if self._logger is None or not self._logger.isEnabledFor(logging.DEBUG):
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE_BYTES:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._log(line)

    def _flush_partial(self) -> None:
        if self._partial:
            self._log(self._partial)
            self._partial = b""

    def _log(self, line: bytes) -> None:
        if self._logger is not None:
            text = line.decode("utf-8", "replace").rstrip("\r")
            self._logger.debug("%s: %s", self._label, text)
