"""Call logs as files: ``<dir>/<xy>/<call id>.log``, one per call.

``xy`` are the id's last two characters, lowercased, anything but a letter or
a digit made ``_``: fnq's own ids end in random characters, which spreads
their files over up to 1,024 directories. Every call id fnq accepts
(:data:`config.domain.CALL_ID_RE`) is a safe file name. A log is written to a
temporary file of its own in the same directory (a new name, created with
``O_EXCL``), flushed to disk and renamed into place, so a reader sees either
the old log or one whole new one: two workers writing the same call's log at
once (one whose reservation lapsed while it still ran) each write their own
file, and the last rename wins. What the store makes is its owner's only:
the directories 0700, the files 0600. A failed write removes its temporary
file and raises StoreUnavailable; one that found no room (no space or inode
left, a disk quota) raises LogStoreFull, which the datastore waits out
(datastore.logroom).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

import aiofiles
import aiofiles.os

from config.domain import CALL_ID_RE
from datastore.errors import LogStoreFull, StoreError, StoreUnavailable

_NOT_ALNUM = re.compile(r"[^a-z0-9]")
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space or inode left; a quota


class FileLogStore:
    def __init__(self, directory: str | Path) -> None:
        if not str(directory):
            raise StoreError("FN_LOG_URL=file:///DIR needs a directory")
        self.directory = Path(directory)

    def path_of(self, call_id: str) -> Path:
        if not CALL_ID_RE.fullmatch(call_id):
            raise StoreError(f"invalid call id {call_id[:80]!r}")
        shard = _NOT_ALNUM.sub("_", call_id[-2:].lower()).rjust(2, "_")
        return self.directory / shard / f"{call_id}.log"

    async def put_log(self, call_id: str, data: bytes) -> None:
        path = self.path_of(call_id)
        try:
            await asyncio.to_thread(self._write, path, data)
        except OSError as exc:
            error = LogStoreFull if exc.errno in NO_ROOM else StoreUnavailable
            raise error(f"writing the log of call {call_id} failed: {exc}") from exc

    def _write(self, path: Path, data: bytes) -> None:
        # The log directory and its shards are made 0700, the files 0600, whatever
        # the umask: a call's output is as private as its body (see create_private).
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp, fd = _new_file(path)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly, whatever the umask took away
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    async def get_log(self, call_id: str) -> bytes | None:
        try:
            async with aiofiles.open(self.path_of(call_id), "rb") as src:
                return await src.read()
        except FileNotFoundError:
            return None

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        for call_id in call_ids:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self.path_of(call_id))

    async def close(self) -> None:
        return None


def _new_file(path: Path) -> tuple[Path, int]:
    """A temporary file beside ``path`` that no other writer uses (a name of its own,
    created with ``O_EXCL``), open for writing: its path and descriptor. Two workers
    writing the log of one call at once may share a process id (workers in
    containers of their own, each pid 1, sharing the log directory)."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:  # another writer's name: draw again
            continue
