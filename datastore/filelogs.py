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
the directories 0700, the files 0600.

The store's first write makes the directory, with its parents; later writes
make only the shards in it. A directory that goes away meanwhile (removed, or
on a disk unmounted from above it) is then an error, not a new directory on
whatever disk is left under its path.

A failed write removes its temporary file and raises:

- LogStoreFull when it found no room (no space or inode left, a disk quota);
- LogRefused when the file system refuses the name of the call's log itself
  (too long, a character it does not take): that log can never be stored;
- LogStoreDown for anything else (a read-only file system, no permission, an
  I/O error, the directory missing): the directory's fault, not the log's.

The datastore waits out the first and the last (datastore.logroom). Each
error names the directory, the call and the system's error, with its path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiofiles
import aiofiles.os

from config.domain import CALL_ID_RE
from datastore.errors import LogRefused, LogStoreDown, LogStoreFull, StoreError, StoreUnavailable

T = TypeVar("T")

_NOT_ALNUM = re.compile(r"[^a-z0-9]")
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space or inode left; a quota
# What a file system may say of the name of a log file as it is created or renamed
# into place: too long (a file system with short names, or a directory path near
# PATH_MAX), a character or encoding it does not take (':' on FAT).
NAME_REFUSED = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


class _NameRefused(Exception):
    """The file system refused the name of a log file (its OSError is the cause)."""


class FileLogStore:
    def __init__(self, directory: str | Path) -> None:
        if not str(directory):
            raise StoreError("FN_LOG_URL=file:///DIR needs a directory")
        self.directory = Path(directory)
        self._made = False  # whether this store has made (or found) its directory

    def path_of(self, call_id: str) -> Path:
        if not CALL_ID_RE.fullmatch(call_id):
            raise StoreError(f"invalid call id {call_id[:80]!r}")
        shard = _NOT_ALNUM.sub("_", call_id[-2:].lower()).rjust(2, "_")
        return self.directory / shard / f"{call_id}.log"

    async def put_log(self, call_id: str, data: bytes) -> None:
        path = self.path_of(call_id)
        try:
            await asyncio.to_thread(self._write, path, data)
        except _NameRefused as refused:
            raise LogRefused(
                f"the log of call {call_id} cannot be stored in {self.directory}: "
                f"{refused.__cause__}"
            ) from refused.__cause__
        except OSError as exc:
            error = LogStoreFull if exc.errno in NO_ROOM else LogStoreDown
            raise error(
                f"writing the log of call {call_id} in {self.directory} failed: {exc}"
            ) from exc

    def _write(self, path: Path, data: bytes) -> None:
        # The log directory and its shards are made 0700, the files 0600, whatever
        # the umask: a call's output is as private as its body (see create_private).
        if not self._made:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._made = True
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp, fd = _named(_new_file, path)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly, whatever the umask took away
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            _named(os.replace, tmp, path)
        except (OSError, _NameRefused):
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    async def get_log(self, call_id: str) -> bytes | None:
        """The call's log; None if there is none (or none can be, see LogRefused)."""
        try:
            async with aiofiles.open(self.path_of(call_id), "rb") as src:
                return await src.read()
        except OSError as exc:
            if exc.errno == errno.ENOENT or exc.errno in NAME_REFUSED:
                return None
            raise StoreUnavailable(
                f"reading the log of call {call_id} in {self.directory} failed: {exc}"
            ) from exc

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        """Delete the logs of ``call_ids``, in their order; a log that is not there is
        deleted already. The first that stays raises StoreUnavailable (those before it
        are gone)."""
        for call_id in call_ids:
            path = self.path_of(call_id)
            try:
                await aiofiles.os.remove(path)
            except OSError as exc:
                if exc.errno == errno.ENOENT or exc.errno in NAME_REFUSED:
                    continue
                # A read-only file system refuses even a name that is not there.
                if not await asyncio.to_thread(os.path.lexists, path):
                    continue
                raise StoreUnavailable(
                    f"deleting the log of call {call_id} in {self.directory} failed: {exc}"
                ) from exc

    async def close(self) -> None:
        return None


def _named(step: Callable[..., T], *args: Path) -> T:
    """``step(*args)``, a step that names the log file: an error of the file system
    about that name raises _NameRefused."""
    try:
        return step(*args)
    except OSError as exc:
        if exc.errno in NAME_REFUSED:
            raise _NameRefused() from exc
        raise


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
