"""A container's stdout and stderr read straight from two named pipes on the host.

The container's command is wrapped in ``/bin/sh -c 'exec "$@" >OUT 2>ERR'``,
where OUT and ERR are named pipes the worker made in the container's socket
directory (``/tmp/iofs`` inside). The function's process is the shell's own,
``exec``'d, with both outputs on those pipes; the worker holds their read
ends from before the start. Nothing of the function's output goes through
the container runtime or the engine.

That makes a call's log exact at no cost: everything the function wrote
before it answered is in the pipes by the time the answer arrives (a write
to a pipe is done when it returns), so reading both pipes until they are
empty, right after the answer, takes all of it and nothing later. There is
no marker to send and wait for (compare drivers.stdio), and no engine work
per line of output.

The worker also holds a write end of each pipe, so that a read never sees
the end of a pipe that the container has not opened yet, or has closed: the
end of the output is the container's exit, which the driver sees anyway.
Images without ``/bin/sh`` keep their command, and their output comes
through the engine (drivers.output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from worker.agent.driver import IOFS_MOUNT

log = logging.getLogger("fnq.agent.docker")

SHELL = "/bin/sh"
NAMES = {1: ".fnq-stdout", 2: ".fnq-stderr"}  # by stream number, as in the attach stream
_SCRIPT = f'exec "$@" >{IOFS_MOUNT}/{NAMES[1]} 2>{IOFS_MOUNT}/{NAMES[2]}'
_READ_BYTES = 65536
_MAX_READS = 64  # per stream and drain: a function that writes without pause cannot hold it


def wrapped_command(command: Sequence[str]) -> list[str]:
    """The entrypoint that runs ``command`` with its output on the pipes."""
    return [SHELL, "-c", _SCRIPT, "fnq-output", *command]


def make_pipes(directory: Path) -> None:
    """Create both named pipes, writable by the container's user (OSError on failure)."""
    for name in NAMES.values():
        path = directory / name
        os.mkfifo(path, 0o600)
        os.chmod(path, 0o666)  # the function runs as uid 1000; mkfifo's mode obeys the umask


class OutputPipes:
    """The read ends (and one write end each) of a container's output pipes."""

    def __init__(self, directory: Path, on_data: Callable[[int, bytes], None]) -> None:
        self._dir = directory
        self._on_data = on_data
        self._fds: dict[int, tuple[int, int]] = {}  # stream -> (read fd, write fd)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll = select.poll()  # which read ends hold something, in one system call

    @property
    def open(self) -> bool:
        return bool(self._fds)

    def start(self) -> None:
        """Open both pipes and read them as output arrives (OSError: nothing held)."""
        self._loop = asyncio.get_running_loop()
        try:
            for stream, name in NAMES.items():
                rfd, wfd = _open_both(self._dir / name)
                self._fds[stream] = (rfd, wfd)
                self._poll.register(rfd, select.POLLIN)
                self._loop.add_reader(rfd, self._read, stream, rfd, 1)
        except OSError:
            self.close()
            raise

    def drain(self) -> None:
        """Read everything the pipes hold now, in order, stdout first."""
        if not self._fds:
            return
        try:
            ready = {fd for fd, _ in self._poll.poll(0)}
        except OSError as exc:
            log.debug("polling the output pipes failed: %s", exc)
            ready = {rfd for rfd, _ in self._fds.values()}
        if ready:  # a call's output has most often been read as it came
            for stream, (rfd, _) in list(self._fds.items()):
                if rfd in ready:
                    self._read(stream, rfd, _MAX_READS)

    def _read(self, stream: int, fd: int, reads: int) -> None:
        for _ in range(reads):
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:  # not expected of a pipe we hold both ends of
                log.debug("reading output pipe %d failed: %s", stream, exc)
                return
            if not data:
                return
            self._on_data(stream, data)
            if len(data) < _READ_BYTES:
                return

    def close(self) -> None:
        """Take what is left, then let go of both pipes."""
        fds, self._fds = self._fds, {}
        for stream, (rfd, wfd) in fds.items():
            if self._loop is not None:
                self._loop.remove_reader(rfd)
            with contextlib.suppress(KeyError):
                self._poll.unregister(rfd)
            self._read(stream, rfd, _MAX_READS)
            for fd in (rfd, wfd):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _open_both(path: Path) -> tuple[int, int]:
    """A read end, then a write end (no wait: a reader is there) of the named pipe."""
    flags = os.O_NONBLOCK | os.O_CLOEXEC
    rfd = os.open(path, os.O_RDONLY | flags)
    try:
        is_fifo = stat.S_ISFIFO(os.fstat(rfd).st_mode)
        wfd = os.open(path, os.O_WRONLY | flags) if is_fifo else -1
    except OSError:
        os.close(rfd)
        raise
    if not is_fifo:
        os.close(rfd)
        raise OSError(f"{path} is not a named pipe")
    return rfd, wfd
