"""Where a container's stdout and stderr go, and how each call's log is closed exactly.

Output is cut into *segments*, one per call, in the order the calls were
dispatched. :meth:`OutputRouter.open` starts the segment of a call that is
about to be dispatched; from then on, output goes to that call's sink. When
the function has answered, :meth:`OutputRouter.seal` writes a marker into the
container's own stdout and stderr pipes (see drivers.stdio). Everything the
function wrote before it answered is in the pipes ahead of the marker, and
pipes, the runtime and the engine all keep order, so on each stream the
segment ends exactly where its marker comes out of the attach stream; the
segment is sealed once both markers are through. Markers are removed from the
output.

The container does not wait for the seal: the next call may be dispatched
while the markers of the last one travel. Its segment only receives, on each
stream, what comes after the last call's marker on that stream, which is
exactly what was written after the answer. Output outside any segment (a
function writing between calls) goes to the ``fnq.function`` logger at
DEBUG, one record per line, or nowhere when FN_DISABLE_DEBUG_USER_LOGS is
set.

A marker that does not come back within the limit gives the segment up
(whatever of it arrives later goes to the next segment or the debug log),
and a marker that arrives after that is still removed. When the pipes cannot
be reached (the worker is not root, the engine runs elsewhere), there are no
markers: :meth:`settle` waits until the stream has been quiet for ``quiet_s``,
at most ``limit_s``, and the caller then ends the segment with :meth:`drop`.
That is right whenever the engine delivers output within ``quiet_s``, which
on a loaded host is not guaranteed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from worker.agent.driver import OutputSink
from worker.agent.drivers.stdio import MARK_BYTES, MARK_PREFIX, STREAMS, ProcessStdio, new_marker

log = logging.getLogger("fnq.agent.docker")
_MAX_LINE_BYTES = 16 * 1024
_TAIL_BYTES = 2048


class Segment:
    """One call's share of the output."""

    __slots__ = ("open_streams", "sealed", "sink", "timer", "token")

    def __init__(self, sink: OutputSink | None, sealed: asyncio.Future[None]) -> None:
        self.sink = sink
        self.sealed = sealed
        self.open_streams = set(STREAMS)  # streams whose marker has not come through
        self.token: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None


class OutputRouter:
    def __init__(self, logger: logging.Logger | None, label: str) -> None:
        self._logger = logger
        self._label = label
        self._segments: deque[Segment] = deque()  # oldest first
        self._by_token: dict[bytes, Segment] = {}
        self._partial = b""
        self._tail = b""
        self._last_chunk_s = 0.0
        self._ended = False
        self._sink_failed = False
        self._carry: dict[int, bytes] = {}  # per stream: a possible marker cut in two
        self._loop: asyncio.AbstractEventLoop | None = None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once (a system call each time on CPython 3.11): this runs per chunk.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def ended(self) -> bool:
        return self._ended

    # ----------------------------------------------------------- segments

    def open(self, sink: OutputSink | None) -> Segment:
        """Send output to ``sink`` from now on, after the segments still open."""
        self._flush_partial()
        segment = Segment(sink, self._running_loop().create_future())
        if self._ended:
            self._finish(segment)
        else:
            self._segments.append(segment)
        return segment

    def seal(self, segment: Segment, stdio: ProcessStdio | None, limit_s: float) -> bool:
        """Write the segment's markers; ``segment.sealed`` resolves when they are through
        (or after ``limit_s``). False if no marker could be written: settle, then drop."""
        if segment.sealed.done():
            return True
        if stdio is None:
            return False
        token, line = new_marker()
        written = stdio.write(line)
        if not written:
            return False
        segment.token = token
        self._by_token[token] = segment
        for stream in STREAMS:
            if stream not in written:  # a full pipe: this stream ends here
                self._close_stream(segment, stream)
        if not segment.sealed.done():
            segment.timer = self._running_loop().call_later(limit_s, self.drop, segment)
        return True

    def drop(self, segment: Segment) -> None:
        """End the segment at once on every stream."""
        for stream in list(segment.open_streams):
            self._close_stream(segment, stream)

    def end(self) -> None:
        """The stream is over: nothing more can come."""
        for stream in list(self._carry):
            self._route(stream, self._carry.pop(stream))
        self._flush_partial()
        self._ended = True
        while self._segments:
            self.drop(self._segments[0])

    def tail(self, max_chars: int = 500) -> str:
        """The last output of the container, for error messages."""
        text = self._tail.decode("utf-8", "replace").strip()
        return text[-max_chars:]

    async def settle(self, quiet_s: float, limit_s: float) -> None:
        """Wait until no output arrived for ``quiet_s`` (see the module docstring)."""
        loop = self._running_loop()
        start = loop.time()
        deadline = start + limit_s
        while not self._ended:
            now = loop.time()
            wait = max(start, self._last_chunk_s) + quiet_s - now
            if wait <= 0 or now >= deadline:
                return
            await asyncio.sleep(min(wait, deadline - now))

    def _close_stream(self, segment: Segment, stream: int) -> None:
        segment.open_streams.discard(stream)
        if not segment.open_streams:
            self._finish(segment)

    def _finish(self, segment: Segment) -> None:
        if segment.timer is not None:
            segment.timer.cancel()
            segment.timer = None
        if segment.token is not None:
            self._by_token.pop(segment.token, None)
        with contextlib.suppress(ValueError):  # not open any more
            self._segments.remove(segment)
        if not segment.sealed.done():
            segment.sealed.set_result(None)

    # -------------------------------------------------------------- input

    def feed(self, stream: int, data: bytes) -> None:
        self._last_chunk_s = self._running_loop().time()
        carried = self._carry.pop(stream, b"")
        if carried:
            data = carried + data
        if b"\x00" in data:
            data = self._split_at_marks(stream, data)
        if data:
            self._route(stream, data)

    def _split_at_marks(self, stream: int, data: bytes) -> bytes:
        """Route what comes before each marker, end its segment there; return the rest."""
        while (start := data.find(MARK_PREFIX)) >= 0:
            end = start + MARK_BYTES
            if len(data) < end:
                break
            if start:
                self._route(stream, data[:start])
            self._mark_seen(stream, data[start + len(MARK_PREFIX) : end - 1])
            data = data[end:]
        else:
            start = self._partial_prefix_at(data)
        if start >= 0:  # a marker begins here but is not complete yet
            self._carry[stream] = data[start:]
            data = data[:start]
        return data

    @staticmethod
    def _partial_prefix_at(data: bytes) -> int:
        """Where a proper prefix of the marker ends ``data``, or -1."""
        at = data.rfind(b"\x00", max(0, len(data) - len(MARK_PREFIX) + 1))
        return at if at >= 0 and MARK_PREFIX.startswith(data[at:]) else -1

    def _mark_seen(self, stream: int, token: bytes) -> None:
        segment = self._by_token.get(token)
        if segment is not None:  # else it arrived after its segment was given up
            self._close_stream(segment, stream)

    def _route(self, stream: int, data: bytes) -> None:
        self._tail = (self._tail + data)[-_TAIL_BYTES:]
        for segment in self._segments:
            if stream in segment.open_streams:
                if segment.sink is not None:
                    self._to_sink(segment.sink, data)
                    return
                break
        self._to_debug_log(data)

    def _to_sink(self, sink: OutputSink, data: bytes) -> None:
        try:
            sink(data)
        except Exception:  # a faulty sink must not stop the container's output: log, go on
            if not self._sink_failed:
                self._sink_failed = True
                log.exception("output sink of %s failed", self._label)

    def _to_debug_log(self, data: bytes) -> None:
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
