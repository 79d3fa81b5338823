"""Per-container socket directories and the watch for the function's listener.

Each hot container gets a directory of its own on the host, bind-mounted at
``/tmp/iofs`` inside; the FDK creates ``lsnr.sock`` there. Readiness is an
inotify event on that directory, watched from before the container starts,
so no creation can be missed and nothing polls.

The listener is checked before anyone connects to it: ``lsnr.sock`` may be a
socket, or a symlink whose target is a bare name in the same directory that
is itself a socket. A link anywhere else would make the worker connect to a
path of the container's choosing on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from config.errors import ConfigError
from config.settings import Settings
from worker.agent.driver import SOCKET_NAME
from worker.agent.errors import SHORTAGE_ERRNOS, ContainerInitFailed

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2
MAX_SOCKET_PATH_BYTES = 107  # sun_path of a unix socket address, less its NUL
# Inodes one socket directory takes: itself, its two output pipes, the function's
# socket and the symlink to it. On a tmpfs of its own, only itself counts in the base.
DIR_INODES = 5


@functools.cache
def _c() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# ------------------------------------------------------------------ directories


@dataclass(frozen=True, slots=True)
class IofsDir:
    host_path: Path  # where the worker sees it
    docker_path: str  # what the engine is told to bind-mount
    mounted: bool  # a tmpfs was mounted on it

    @property
    def socket_path(self) -> Path:
        return self.host_path / SOCKET_NAME


class IofsRoot:
    """The directory holding every socket directory of one driver.

    All methods do file-system work and are meant to run in a thread.
    """

    def __init__(self, settings: Settings, unprivileged: bool) -> None:
        self._settings = settings
        self._unprivileged = unprivileged
        self._own_base = not settings.iofs_path
        self.base = Path(settings.iofs_path) if settings.iofs_path else None

    def open(self) -> None:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="fnq-iofs-"))
        # Private to the worker's user: each socket directory in it is open to all (the
        # function's uid must make its socket there), so other users of the host must
        # not reach them. An existing one is left as it is.
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)

    def make(self, name: str) -> IofsDir:
        if self.base is None:
            raise RuntimeError("IofsRoot.open() was not called")
        path = Path(tempfile.mkdtemp(prefix=f"iofs-{name[:16]}-", dir=self.base))
        if len(bytes(path / SOCKET_NAME)) > MAX_SOCKET_PATH_BYTES:
            path.rmdir()
            raise ConfigError(
                f"FN_IOFS_PATH={self.base} is too long: socket paths must fit in "
                f"{MAX_SOCKET_PATH_BYTES} bytes"
            )
        mounted = False
        try:
            if self._settings.iofs_tmpfs:
                opts = self._settings.iofs_opts.encode() or None
                flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
                _check(_c().mount(b"tmpfs", bytes(path), b"tmpfs", flags, opts), "mount tmpfs")
                mounted = True
            if self._unprivileged:
                path.chmod(0o777)  # the function runs as uid 1000 and must create its socket
        except OSError:
            self._remove_path(path, mounted)
            raise
        return IofsDir(path, self._docker_path(path), mounted)

    def _docker_path(self, path: Path) -> str:
        docker_root = self._settings.iofs_docker_path
        if not docker_root or self.base is None:
            return str(path)
        return str(Path(docker_root) / path.relative_to(self.base))

    def remove(self, iofs: IofsDir) -> None:
        self._remove_path(iofs.host_path, iofs.mounted)

    @staticmethod
    def _remove_path(path: Path, mounted: bool) -> None:
        if mounted:
            result = _c().umount2(bytes(path), _MNT_DETACH)
            if result < 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
                _check(result, f"umount {path}")
        remove_tree(path)

    def short_of_inodes(self) -> bool:
        """Whether the base's file system lacks the inodes of another socket directory
        (one that goes gives back as many); False where it counts no inodes or cannot
        tell. One statvfs: cheap enough for the event loop."""
        if self.base is None:
            return False
        needed = 1 if self._settings.iofs_tmpfs else DIR_INODES
        try:
            st = os.statvfs(self.base)
        except OSError:
            return False
        return st.f_files > 0 and st.f_favail < needed

    def close(self) -> None:
        """Remove the base directory if this driver made it (and it is empty)."""
        if self._own_base and self.base is not None:
            with contextlib.suppress(OSError):
                self.base.rmdir()


def check_room(directory: Path) -> None:
    """OSError (ENOSPC) when the file system of the socket directory ``directory`` has
    no inode left for the function's socket: the function would fail to start, for
    want of room on the host. (A file system that counts no inodes, such as btrfs,
    reports none at all: it has room.)"""
    st = os.statvfs(directory)
    if st.f_files > 0 and st.f_favail == 0:
        raise OSError(errno.ENOSPC, "no inode left for the function's socket", str(directory))


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything in it, as far as possible; never raises.

    The function fills its socket directory as it likes, so this takes any
    depth: it goes down and up through descriptors (no recursion, no path
    that grows with the depth, which shutil.rmtree has both of), and follows
    no symlink. An entry that cannot be removed is left, and the rest goes.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()  # not a directory (or gone already)
        return
    _empty_tree(fd)
    with contextlib.suppress(OSError):
        path.rmdir()


def _empty_tree(fd: int) -> None:
    """Empty the directory ``fd``, and close it.

    The way back up is "..", checked against the directory that was left on
    the way down: a process still running in the tree may move the directory
    being emptied elsewhere in it (closer to the top, say), and ".." counted
    as before would then lead above the top. A mismatch stops the removal:
    what is left stays.
    """
    names: list[str] = []  # the way down: a directory name per level
    parents: list[tuple[int, int]] = []  # the way down: the directory above, per level
    stuck: set[tuple[int, int]] = set()  # directories that could not be emptied
    try:
        while True:
            sub = _empty_files(fd, stuck)
            if sub is not None:
                try:
                    child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    _mark_stuck(stuck, fd, sub)
                    continue
                parents.append(_identity(fd))
                fd, above = child, fd
                os.close(above)
                names.append(sub)
                continue
            if not names:
                return
            fd, below = os.open("..", _DIR_FLAGS, dir_fd=fd), fd
            os.close(below)
            if _identity(fd) != parents.pop():
                return  # moved meanwhile: this is not the directory it came from
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                _mark_stuck(stuck, fd, name)
    except OSError:
        pass  # the way back up is gone: leave what is left
    finally:
        os.close(fd)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _mark_stuck(stuck: set[tuple[int, int]], dir_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        stuck.add((st.st_dev, st.st_ino))


def _empty_files(fd: int, stuck: set[tuple[int, int]]) -> str | None:
    """Unlink every entry of the directory ``fd`` but subdirectories; the name of
    one subdirectory still to empty (None when there is none)."""
    try:
        entries = os.listdir(fd)
    except OSError:
        return None
    for name in entries:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
            elif (st.st_dev, st.st_ino) not in stuck:
                return name
        except OSError:
            continue
    return None


# ------------------------------------------------------------------ readiness


def check_listener(directory: Path) -> None:
    """Raise ContainerInitFailed unless ``lsnr.sock`` is a socket or a safe link to one;
    FileNotFoundError while there is no ``lsnr.sock``."""
    os.close(open_listener(directory))


def open_listener(directory: Path) -> int:
    """An ``O_PATH`` descriptor of the function's listener: ``lsnr.sock`` if it is a
    socket, else the socket its symlink names (a bare name in ``directory``).

    Connecting through ``/proc/self/fd/N`` reaches that very socket, whatever the
    container renames or relinks in between: a check of the path followed by a
    connect to the path would let it swap in a link to any socket on the host.
    Raises ContainerInitFailed for a listener the rule refuses, FileNotFoundError
    while there is no ``lsnr.sock``.
    """
    path = directory / SOCKET_NAME
    try:
        target = os.readlink(path)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a link (the socket itself, say)
            raise
        return _open_socket(path, SOCKET_NAME)
    name = target[2:] if target.startswith("./") else target
    if not name or "/" in name or name in (".", ".."):
        raise ContainerInitFailed(
            f"the function's {SOCKET_NAME} is a symlink to {target!r}: symlinks must "
            "be relative within the unix socket directory (a bare file name)"
        )
    try:
        return _open_socket(directory / name, name)
    except FileNotFoundError:
        raise ContainerInitFailed(
            f"the function's {SOCKET_NAME} is a symlink to {target!r}, which does not exist"
        ) from None
    except OSError as exc:  # a name the function chose, e.g. over 255 bytes
        if exc.errno in SHORTAGE_ERRNOS:  # no descriptor left: the host is short, not at fault
            raise
        raise ContainerInitFailed(
            f"the function's {SOCKET_NAME} is a symlink to {target!r}: {exc.strerror}"
        ) from None


def _open_socket(path: Path, name: str) -> int:
    """``path`` itself (no link followed), if it is a unix socket."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise ContainerInitFailed(f"the function's {SOCKET_NAME} ({name}) is not a unix socket")
    return fd


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class SocketWatcher:
    """Watches one directory for ``lsnr.sock``; use as a context manager.

    Enter it before the container starts; then ``await ready()``.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._result: asyncio.Future[None] | None = None

    def __enter__(self) -> SocketWatcher:
        self._loop = asyncio.get_running_loop()
        self._result = self._loop.create_future()
        libc = _c()
        self._fd = _check(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        try:
            _check(
                libc.inotify_add_watch(self._fd, bytes(self._dir), _IN_CREATE | _IN_MOVED_TO),
                f"inotify_add_watch {self._dir}",
            )
            self._loop.add_reader(self._fd, self._on_readable)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._inspect()  # in case it is already there
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0 or self._loop is None:
            return
        self._loop.remove_reader(fd)
        # Closing an inotify descriptor waits for the kernel's RCU grace period, often
        # 8-16 ms: in a thread, not holding up every call on the event loop.
        try:
            self._loop.run_in_executor(None, _close_quietly, fd)
        except RuntimeError:  # the loop's executor is shut down: at exit, close here
            _close_quietly(fd)

    async def ready(self) -> None:
        """Return once a valid listener exists; ContainerInitFailed for a bad one."""
        if self._result is None:
            raise RuntimeError("SocketWatcher used outside its context")
        await asyncio.shield(self._result)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(exc)
            return
        offset = 0
        while offset + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW or name == SOCKET_NAME.encode():
                self._inspect()

    def _inspect(self) -> None:
        if self._result is None or self._result.done():
            return
        try:
            check_listener(self._dir)
        except FileNotFoundError:
            return  # not there yet
        except (ContainerInitFailed, OSError) as exc:
            self._finish(exc)
            return
        self._result.set_result(None)

    def _finish(self, exc: BaseException) -> None:
        if self._result is not None and not self._result.done():
            self._result.set_exception(exc)
