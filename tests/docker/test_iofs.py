"""Socket directories and the readiness watch, on the local file system (no docker needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import Settings
from worker.agent.errors import ContainerInitFailed
from worker.agent.iofs import IofsRoot, SocketWatcher, check_listener


def bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_plain_socket_and_relative_link_are_accepted(tmp_path: Path) -> None:
    with bind(tmp_path / "lsnr.sock"):
        check_listener(tmp_path)
    (tmp_path / "lsnr.sock").unlink()
    with bind(tmp_path / "phonylsnr.sock"):
        os.symlink("phonylsnr.sock", tmp_path / "lsnr.sock")
        check_listener(tmp_path)


@pytest.mark.parametrize("target", ["/tmp/elsewhere.sock", "../lsnr.sock", "sub/x.sock"])
def test_links_out_of_the_directory_are_refused(tmp_path: Path, target: str) -> None:
    os.symlink(target, tmp_path / "lsnr.sock")
    with pytest.raises(ContainerInitFailed, match="symlink"):
        check_listener(tmp_path)


def test_a_link_to_a_name_too_long_is_refused(tmp_path: Path) -> None:
    os.symlink("x" * 300, tmp_path / "lsnr.sock")  # lstat: ENAMETOOLONG, was raised as is
    with pytest.raises(ContainerInitFailed, match=r"symlink to 'x{300}': File name too long"):
        check_listener(tmp_path)


def test_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "lsnr.sock").write_text("not a socket")
    with pytest.raises(ContainerInitFailed, match="not a unix socket"):
        check_listener(tmp_path)


async def test_watcher_sees_the_link_appear(tmp_path: Path) -> None:
    with SocketWatcher(tmp_path) as watcher:
        waiter = asyncio.create_task(watcher.ready(), name="test-ready")
        await asyncio.sleep(0)
        assert not waiter.done()
        with bind(tmp_path / "phonylsnr.sock"):
            os.symlink("phonylsnr.sock", tmp_path / "lsnr.sock")
            await asyncio.wait_for(waiter, 2)


async def test_watcher_reports_a_bad_link(tmp_path: Path) -> None:
    with SocketWatcher(tmp_path) as watcher:
        os.symlink("/etc/passwd", tmp_path / "lsnr.sock")
        with pytest.raises(ContainerInitFailed, match="symlink"):
            await asyncio.wait_for(watcher.ready(), 2)


async def test_the_watchers_descriptor_is_closed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing an inotify descriptor waits for an RCU grace period (often 8-16 ms):
    # done on the loop's thread, it would hold up every call in flight.
    closed_by: list[int] = []  # threads that closed the watcher's descriptor
    real_close = os.close
    watched = -1

    def close(fd: int) -> None:
        if fd == watched:
            closed_by.append(threading.get_ident())
        real_close(fd)

    monkeypatch.setattr("worker.agent.iofs.os.close", close)
    with SocketWatcher(tmp_path) as watcher:
        watched = watcher._fd
        assert watched >= 0
        assert os.readlink(f"/proc/self/fd/{watched}") == "anon_inode:inotify"
    for _ in range(200):
        if closed_by:
            break
        await asyncio.sleep(0.01)
    assert len(closed_by) == 1 and closed_by[0] != threading.get_ident()


def test_directories_are_made_open_and_removed(settings_env: Path, tmp_path: Path) -> None:
    root = IofsRoot(Settings(iofs_path=str(tmp_path / "io")), unprivileged=True)
    root.open()
    made = root.make("fnq-abc")
    assert made.host_path.parent == tmp_path / "io"
    assert made.host_path.stat().st_mode & 0o777 == 0o777
    # Open to all, in a directory that only the worker's user can enter.
    assert (tmp_path / "io").stat().st_mode & 0o777 == 0o700
    assert made.docker_path == str(made.host_path)
    root.remove(made)
    assert not made.host_path.exists()


def test_docker_path_is_translated(settings_env: Path, tmp_path: Path) -> None:
    settings = Settings(iofs_path=str(tmp_path / "io"), iofs_docker_path="/hostside/io")
    root = IofsRoot(settings, unprivileged=False)
    root.open()
    made = root.make("fnq-abc")
    assert made.docker_path == f"/hostside/io/{made.host_path.name}"
    root.remove(made)


def test_too_long_a_path_is_a_config_error(settings_env: Path, tmp_path: Path) -> None:
    root = IofsRoot(Settings(iofs_path=str(tmp_path / ("x" * 100))), unprivileged=True)
    root.open()
    with pytest.raises(ConfigError, match="too long"):
        root.make("fnq-abc")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_tmpfs_is_mounted_and_unmounted(settings_env: Path, tmp_path: Path) -> None:
    settings = Settings(iofs_path=str(tmp_path / "io"), iofs_tmpfs=True, iofs_opts="size=1m")
    root = IofsRoot(settings, unprivileged=True)
    root.open()
    made = root.make("fnq-abc")
    mounts = Path("/proc/self/mounts").read_text()
    assert f" {made.host_path} tmpfs " in mounts
    root.remove(made)
    assert f" {made.host_path} " not in Path("/proc/self/mounts").read_text()
    assert not made.host_path.exists()
