"""The file log store: every call id fnq accepts has a log file of its own."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from config.domain import new_call_id
from config.settings import load_settings
from datastore.base import open_log_store
from datastore.errors import LogRefused, LogStoreDown, LogStoreFull, StoreError, StoreUnavailable
from datastore.filelogs import FileLogStore
from tests.rig import fill_space, long_directory, remount, small_tmpfs

# Ids any producer may send (the wire format's rule), and RQ's job ids.
IDS = [
    "order-1234",
    "a.b:c_d",
    "x",
    "a..",
    "5f0e9a1c-3b1d-4c55-9f0a-2a6f4b8c9d10",
    "Z9",
    new_call_id(),
]


@pytest.mark.parametrize("call_id", IDS)
async def test_every_valid_id_round_trips(tmp_path: Path, call_id: str) -> None:
    store = FileLogStore(tmp_path)
    await store.put_log(call_id, f"log of {call_id}\n".encode())
    assert await store.get_log(call_id) == f"log of {call_id}\n".encode()
    path = store.path_of(call_id)
    assert path.is_file() and path.name == f"{call_id}.log"
    assert path.resolve().parent.parent == tmp_path.resolve()  # one shard level, inside
    await store.delete_logs([call_id])
    assert await store.get_log(call_id) is None


async def test_ids_that_differ_only_in_case_keep_apart(tmp_path: Path) -> None:
    store = FileLogStore(tmp_path)
    await store.put_log("job-Ab", b"upper\n")
    await store.put_log("job-ab", b"lower\n")
    assert await store.get_log("job-Ab") == b"upper\n"
    assert await store.get_log("job-ab") == b"lower\n"


@pytest.mark.parametrize("call_id", ["", "../etc/passwd", "a/b", ".hidden", "-x", "x" * 129])
def test_ids_that_are_not_call_ids_are_refused(tmp_path: Path, call_id: str) -> None:
    with pytest.raises(StoreError, match="invalid call id"):
        FileLogStore(tmp_path).path_of(call_id)


async def test_a_failed_write_is_the_store_s_fault_and_names_its_directory(
    tmp_path: Path,
) -> None:
    """The datastore waits it out (datastore.logroom), as an outage."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    store = FileLogStore(blocked)
    with pytest.raises(LogStoreDown) as raised:
        await store.put_log("order-1", b"x")
    assert str(raised.value) == (
        f"writing the log of call order-1 in {blocked} failed: [Errno 17] File exists: '{blocked}'"
    )
    assert isinstance(raised.value, StoreUnavailable)  # Retryable
    assert not isinstance(raised.value, LogStoreFull)  # no room is not what failed


async def test_a_write_on_a_full_disk_leaves_no_file_behind(tmp_path: Path) -> None:
    """The disk fills up half-way through a log: its temporary file goes, so that it
    holds no space and is not left behind; with room again the log is written."""
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        store = FileLogStore(directory)
        await store.put_log("first-00", b"fits")  # the shard directory of both is there now
        filler = fill_space(directory)
        filler.write_bytes(filler.read_bytes()[: -64 * 1024])  # 64 KiB left
        with pytest.raises(LogStoreFull, match="No space left on device"):
            await store.put_log("second-00", b"x" * 128 * 1024)
        left = sorted(p.name for p in directory.rglob("*") if p.is_file())
        assert left == ["first-00.log", "fnq-test-filler"]
        filler.unlink()
        await store.put_log("second-00", b"x" * 128 * 1024)
        assert await store.get_log("second-00") == b"x" * 128 * 1024


async def test_a_log_url_is_read_as_its_bytes_and_refuses_nul(settings_env: Path) -> None:
    store = await open_log_store(load_settings(log_url=f"file://{settings_env}/caf%E9"))
    assert isinstance(store, FileLogStore)
    assert store.directory == settings_env / "caf\udce9"  # b"caf\xe9", not U+FFFD
    with pytest.raises(StoreError, match="a log directory URL is file:///ABSOLUTE/DIR"):
        await open_log_store(load_settings(log_url=f"file://{settings_env}/a%00b"))


async def test_what_the_store_makes_is_its_owners_only(tmp_path: Path) -> None:
    """A call's output is as private as its body: the log directory and its shards
    are made 0700 and the files 0600, whatever the umask."""
    directory = tmp_path / "logs"
    store = FileLogStore(directory)
    old_umask = os.umask(0o022)
    try:
        await store.put_log("order-1234", b"secret output\n")
        await store.put_log("order-1234", b"the next attempt's output\n")
    finally:
        os.umask(old_umask)
    path = store.path_of("order-1234")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["order-1234.log"]  # no temp file
    assert await store.get_log("order-1234") == b"the next attempt's output\n"


async def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = FileLogStore(tmp_path)
    path = store.path_of("order-1")
    path.parent.mkdir()
    path.mkdir()  # a directory where the log file goes: the rename fails
    with pytest.raises(
        LogStoreDown, match=r"order-1 in .* failed: \[Errno 21\] Is a dir"
    ) as raised:
        await store.put_log("order-1", b"x")
    assert not isinstance(raised.value, LogStoreFull)  # no room is not what failed
    assert sorted(p.name for p in path.parent.iterdir()) == ["order-1.log"]


async def test_two_writers_of_one_log_at_once_leave_one_whole_log(tmp_path: Path) -> None:
    """Two workers ending the same call at once (one whose reservation lapsed while it
    still ran): each write succeeds, and the file is one of the two logs, whole. Two
    stores in one process share a process id, as two workers in containers of their
    own (each pid 1) sharing the log directory do."""
    first, second = FileLogStore(tmp_path), FileLogStore(tmp_path)
    long_log, short_log = b"a" * (4 << 20), b"b" * (1 << 20)
    for _ in range(10):
        await asyncio.gather(
            first.put_log("order-1", long_log), second.put_log("order-1", short_log)
        )
        assert await first.get_log("order-1") in (long_log, short_log)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["_1", "order-1.log"]


async def test_a_write_that_fails_midway_keeps_the_previous_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileLogStore(tmp_path)
    await store.put_log("order-1", b"first\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        await store.put_log("order-1", b"second\n")
    assert await store.get_log("order-1") == b"first\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["_1", "order-1.log"]


async def test_a_read_only_file_system_is_the_store_s_fault(tmp_path: Path) -> None:
    """A real tmpfs remounted read-only, as the kernel does to a disk after errors:
    writes fail with LogStoreDown naming the directory, deletes with StoreUnavailable;
    reads go on. Read-write again, the log is written."""
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        store = FileLogStore(directory)
        await store.put_log("first-00", b"kept")
        remount(directory, "ro")
        try:
            with pytest.raises(LogStoreDown) as raised:
                await store.put_log("second-00", b"x")
            assert str(raised.value).startswith(
                f"writing the log of call second-00 in {directory} failed: "
                "[Errno 30] Read-only file system: "
            )
            assert not isinstance(raised.value, LogStoreFull)
            assert await store.get_log("first-00") == b"kept"
            with pytest.raises(StoreUnavailable, match=r"deleting the log of call first-00 in "):
                await store.delete_logs(["first-00"])
        finally:
            remount(directory, "rw")
        await store.put_log("second-00", b"x")
        assert await store.get_log("second-00") == b"x"


async def test_a_directory_gone_after_the_first_write_is_not_made_again(tmp_path: Path) -> None:
    """The first write makes the directory and its parents; later ones make only the
    shards, so that a directory that went away (on a disk unmounted from above it)
    is an error, not a new directory on the disk left under its path."""
    directory = tmp_path / "disk" / "logs"
    store = FileLogStore(directory)
    await store.put_log("first-00", b"x")
    (tmp_path / "disk").rename(tmp_path / "unmounted")
    with pytest.raises(LogStoreDown, match=r"\[Errno 2\] No such file or directory: "):
        await store.put_log("second-01", b"y")
    assert not (tmp_path / "disk").exists()
    assert await store.get_log("first-00") is None  # not there: nothing to read
    (tmp_path / "unmounted").rename(tmp_path / "disk")
    await store.put_log("second-01", b"y")
    assert await store.get_log("second-01") == b"y"
    shutil.rmtree(tmp_path / "disk")
    await FileLogStore(directory).put_log("third-02", b"z")  # a new store makes it again
    assert await store.get_log("third-02") == b"z"


async def test_a_name_the_file_system_refuses_is_refused_for_good(tmp_path: Path) -> None:
    """A path longer than the system takes (PATH_MAX, 4,096 bytes) for the longest
    call ids, under a directory of 4,000 characters: the log of such a call can never
    be stored there (LogRefused), those of shorter ids can. Reading it finds none."""
    store = FileLogStore(long_directory(tmp_path, 4000))
    short, longest = "order-1", "o" * 128
    await store.put_log(short, b"fits")
    with pytest.raises(LogRefused) as raised:
        await store.put_log(longest, b"never")
    assert str(raised.value).startswith(
        f"the log of call {longest} cannot be stored in {store.directory}: "
        "[Errno 36] File name too long: "
    )
    assert not isinstance(raised.value, StoreUnavailable)  # not Retryable: no wait
    assert await store.get_log(longest) is None
    await store.delete_logs([longest, short])
    assert await store.get_log(short) is None
    assert list(store.path_of(short).parent.iterdir()) == []  # no temporary file left


async def test_what_is_not_a_log_file_fails_reads_and_deletes(tmp_path: Path) -> None:
    store = FileLogStore(tmp_path)
    store.path_of("order-1").mkdir(parents=True)  # a directory where the log goes
    with pytest.raises(StoreUnavailable, match=r"reading the log of call order-1 in .* Is a dir"):
        await store.get_log("order-1")
    with pytest.raises(StoreUnavailable, match=r"deleting the log of call order-1 in "):
        await store.delete_logs(["order-1"])
