"""A call's log: the container's output while that call runs, bounded in size.

Output past ``limit_bytes`` is cut at exactly the limit and followed by one
marker line; everything later is dropped. Writes never fail or block, so a
chatty function is never slowed down by its own log.
"""

from __future__ import annotations

import logging

user_log = logging.getLogger("fnq.user")


def truncation_marker(limit_bytes: int) -> bytes:
    return f"\n[fnq: log exceeded {limit_bytes} bytes; the rest is dropped]\n".encode()


class LogBuffer:
    def __init__(self, limit_bytes: int, *, label: str = "", debug_copy: bool = False) -> None:
        self.limit_bytes = limit_bytes
        self.label = label
        self.debug_copy = debug_copy
        self._parts: list[bytes] = []
        self._size = 0
        self.truncated = False
        self.dropped_bytes = 0

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self.debug_copy and user_log.isEnabledFor(logging.DEBUG):
            user_log.debug("%s %s", self.label, chunk.decode("utf-8", "replace").rstrip("\n"))
        if self.truncated:
            self.dropped_bytes += len(chunk)
            return
        room = self.limit_bytes - self._size
        if len(chunk) <= room:
            self._parts.append(chunk)
            self._size += len(chunk)
            return
        self._parts.append(chunk[:room])
        self._parts.append(truncation_marker(self.limit_bytes))
        self._size = self.limit_bytes
        self.truncated = True
        self.dropped_bytes += len(chunk) - room

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def __len__(self) -> int:
        return self._size
