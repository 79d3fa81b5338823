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

The pipes are identified by inode when the container starts; a marker is
only written into the very same pipes, never into whatever process may later
reuse the pid.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

MARK_PREFIX = b"\x00fnq-mark:"
_TOKEN_HEX = 16
MARK_BYTES = len(MARK_PREFIX) + _TOKEN_HEX + 1  # prefix, token, newline
_STREAMS = (1, 2)  # stdout, stderr


def new_marker() -> tuple[bytes, bytes]:
    """A fresh (token, marker line)."""
    token = secrets.token_hex(_TOKEN_HEX // 2).encode()
    return token, MARK_PREFIX + token + b"\n"


class ProcessStdio:
    """The output pipes of one process, opened by path for each marker."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._inodes: dict[int, int] = {}

    def probe(self) -> bool:
        """Record the pipes' identity; False when they cannot be written (no permission,
        another pid namespace, not pipes)."""
        for fd in _STREAMS:
            try:
                info = os.stat(f"/proc/{self._pid}/fd/{fd}")
            except OSError:
                return False
            if not stat.S_ISFIFO(info.st_mode):
                return False
            self._inodes[fd] = info.st_ino
        return self.write(b"") == len(_STREAMS)

    def write(self, data: bytes) -> int:
        """Write ``data`` into each pipe still identical to the probed one; how many took it."""
        written = 0
        for fd, inode in self._inodes.items():
            try:
                handle = os.open(f"/proc/{self._pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if os.fstat(handle).st_ino != inode:
                    continue
                if data and os.write(handle, data) != len(data):
                    continue  # a partial write cannot happen below PIPE_BUF, but be safe
                written += 1
            except OSError:
                continue  # full pipe (EAGAIN) or gone: the caller falls back
            finally:
                with contextlib.suppress(OSError):
                    os.close(handle)
        return written
