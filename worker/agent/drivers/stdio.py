"""A write into a container's own stdout and stderr pipes, to mark a point in its output.

The container's first process (docker's init) holds the write ends of the
pipes that carry its output to the runtime; every process of the function
inherits them. A worker on the same host with the right to read
``/proc/<pid>/fd`` can open those pipes too, and what it writes there comes
out of the attach stream *after* everything written before it: a pipe keeps
order, and so do the runtime and the engine that copy it along.

That is what makes a call's log exact: once the function has answered, the
driver writes a marker into both pipes, and when both markers have come back
through the attach stream, all output written before the answer has arrived.

The worker opens both pipes once, when the container is ready, and keeps
them until the container is going away: a marker then costs one write per
pipe. Holding a write end keeps the pipe open, so the engine would not see
the end of the container's output (and would wait for it) when the container
exits: the driver closes them the moment the container's first process exits
(it watches a pidfd), as soon as a call's exchange breaks (the container may
be dying), and before it removes the container.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

MARK_PREFIX = b"\x00fnq-mark:"
_TOKEN_HEX = 16
MARK_BYTES = len(MARK_PREFIX) + _TOKEN_HEX + 1  # prefix, token, newline
STREAMS = (1, 2)  # stdout, stderr, numbered as in the attach stream


def new_marker() -> tuple[bytes, bytes]:
    """A fresh (token, marker line)."""
    token = secrets.token_hex(_TOKEN_HEX // 2).encode()
    return token, MARK_PREFIX + token + b"\n"


class ProcessStdio:
    """Write ends of one process's stdout and stderr pipes, held open."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._fds: list[int] = []

    def probe(self) -> bool:
        """Open both pipes; False (holding nothing) when they cannot be written: no
        permission, another pid namespace, not pipes."""
        for stream in STREAMS:
            try:
                fd = os.open(f"/proc/{self._pid}/fd/{stream}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                self.close()
                return False
            self._fds.append(fd)
            try:
                is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
            except OSError:
                is_pipe = False
            if not is_pipe:
                self.close()
                return False
        return True

    def write(self, data: bytes) -> tuple[int, ...]:
        """Write ``data`` into each pipe; the streams that took it whole."""
        written: list[int] = []
        for stream, fd in zip(STREAMS, self._fds, strict=False):
            try:
                # A marker is below PIPE_BUF, so a pipe takes it whole or not at all.
                if os.write(fd, data) == len(data):
                    written.append(stream)
            except OSError:
                continue  # full pipe (EAGAIN) or no reader left: the caller falls back
        return tuple(written)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
