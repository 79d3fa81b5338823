"""Call logs kept apart from the records (FN_LOG_URL=file:///DIR) while records are
purged or reopened: a failure to delete logs, at any step, leaves no log that no
record leads to, and no reopened record that shows the log of its last run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from config.domain import Call, CallStatus, FailureKind, Outcome, new_call_id, utcnow
from config.settings import Settings
from datastore import base, upkeep
from datastore.base import LogStore
from datastore.common import SqlDatastore
from datastore.errors import LogNotDeleted, StoreError, StoreUnavailable
from datastore.filelogs import FileLogStore
from tests.datastore.conftest import MakeStore
from tests.rig import remount, small_tmpfs

pytestmark = pytest.mark.integration


class FaultyLogs:
    """A FileLogStore whose deletes fail, while ``deletes_left`` is not None, once that
    many logs have been deleted (as an I/O error or a full stop would, midway)."""

    def __init__(self, inner: FileLogStore) -> None:
        self.inner = inner
        self.deletes_left: int | None = None

    async def put_log(self, call_id: str, data: bytes) -> None:
        await self.inner.put_log(call_id, data)

    async def get_log(self, call_id: str) -> bytes | None:
        return await self.inner.get_log(call_id)

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        for call_id in call_ids:
            if self.deletes_left is not None:
                if self.deletes_left == 0:
                    raise StoreUnavailable(f"deleting the log of call {call_id} failed: EIO")
                self.deletes_left -= 1
            await self.inner.delete_logs([call_id])

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FaultyLogs]:
    """The log store the datastores opened in the test get (in ``tmp_path/logs``)."""
    logs = FaultyLogs(FileLogStore(tmp_path / "logs"))

    async def open_faulty(settings: Settings) -> LogStore | None:
        return logs

    monkeypatch.setattr(base, "open_log_store", open_faulty)
    yield logs


def ended(log: bytes) -> tuple[Call, Outcome]:
    c = Call(id=new_call_id(), app="shop", fn="resize", body=b"{}")
    now = utcnow()
    return c, Outcome(
        CallStatus.ERROR,
        error="boom",
        failure=FailureKind.FUNCTION,
        log=log,
        started_at=now,
        completed_at=now,
    )


async def end_calls(store: SqlDatastore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        c, outcome = ended(f"log {i}\n".encode())
        assert await store.record_outcome(c, outcome, 1, "w", with_request=True)
        ids.append(c.id)
    return ids


def log_files(directory: Path) -> set[str]:
    return {p.name.removesuffix(".log") for p in directory.rglob("*.log")}


async def orphans(store: SqlDatastore, directory: Path) -> set[str]:
    """The log files in ``directory`` that no record leads to."""
    files = log_files(directory)
    return files - set(await store.get_calls(sorted(files)))


async def test_a_purge_whose_log_deletes_fail_leaves_their_records_for_the_next(
    make_store: MakeStore,
    faulty: FaultyLogs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In chunks of two, the third log's delete fails: the first chunk is gone, the
    second keeps its records (one without its log), the third is not reached; no
    log is left without a record, and the next purge takes the rest."""
    monkeypatch.setattr(upkeep, "PURGE_CHUNK", 2)
    store = await make_store(log_url=f"file://{tmp_path / 'logs'}")
    ids = await end_calls(store, 5)
    faulty.deletes_left = 3
    with pytest.raises(StoreUnavailable, match="EIO"):
        await store.purge_calls(timedelta(0))
    assert set(await store.get_calls(ids)) == set(ids[2:])
    assert log_files(tmp_path / "logs") == set(ids[3:])
    assert await orphans(store, tmp_path / "logs") == set()
    faulty.deletes_left = None
    assert await store.purge_calls(timedelta(0)) == 3
    assert await store.get_calls(ids) == {}
    assert log_files(tmp_path / "logs") == set()


async def test_a_record_whose_log_is_gone_already_is_purged(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """A purge stopped between a chunk's logs and its records (killed, say) left
    records without logs: the next purge deletes them."""
    store = await make_store(log_url=f"file://{tmp_path / 'logs'}")
    ids = await end_calls(store, 2)
    for path in (tmp_path / "logs").rglob("*.log"):
        path.unlink()
    assert await store.purge_calls(timedelta(0)) == 2
    assert await store.get_calls(ids) == {}


async def test_a_purge_on_a_read_only_log_directory_keeps_records_and_logs(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """A real tmpfs remounted read-only: the purge fails, every record still leads to
    its log; once writable again, the purge removes both."""
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        store = await make_store(log_url=f"file://{directory}")
        ids = await end_calls(store, 2)
        remount(directory, "ro")
        try:
            with pytest.raises(StoreError, match="Read-only file system"):
                await store.purge_calls(timedelta(0))
        finally:
            remount(directory, "rw")
        assert set(await store.get_calls(ids)) == set(ids)
        assert [await store.get_log(i) for i in ids] == [b"log 0\n", b"log 1\n"]
        assert await store.purge_calls(timedelta(0)) == 2
        assert log_files(directory) == set()


Reopen = Callable[[SqlDatastore, str], Awaitable[object]]
REOPENS: dict[str, Reopen] = {
    "retry": lambda store, call_id: store.retry_call(call_id),
    "reopen": lambda store, call_id: store.reopen_call(call_id),
}


@pytest.mark.parametrize("how", sorted(REOPENS))
async def test_a_call_whose_old_log_cannot_be_deleted_stays_ended_with_it(
    make_store: MakeStore, faulty: FaultyLogs, tmp_path: Path, how: str
) -> None:
    """Retried or reopened (a requeued dead letter): the delete of its old log fails,
    so the record stays as it was, the log its own; once the delete works, the call
    is queued with no log."""
    store = await make_store(log_url=f"file://{tmp_path / 'logs'}")
    (call_id,) = await end_calls(store, 1)
    faulty.deletes_left = 0
    with pytest.raises(LogNotDeleted) as failed:
        await REOPENS[how](store, call_id)
    assert str(failed.value) == (
        f"deleting the log of call {call_id} failed: EIO; call {call_id} stays error"
    )
    rec = await store.get_call(call_id)
    assert rec is not None and (rec.status, rec.attempts) == (CallStatus.ERROR, 1)
    assert await store.get_log(call_id) == b"log 0\n"
    faulty.deletes_left = None
    await REOPENS[how](store, call_id)
    rec = await store.get_call(call_id)
    assert rec is not None and (rec.status, rec.attempts) == (CallStatus.QUEUED, 0)
    assert await store.get_log(call_id) is None


async def test_a_log_that_is_not_there_is_deleted_even_from_a_read_only_directory(
    tmp_path: Path,
) -> None:
    """Linux refuses to unlink on a read-only file system a name that does not exist:
    that log is gone all the same, and a record without a log can be purged."""
    with small_tmpfs(tmp_path / "logs", "size=256k") as directory:
        logs = FileLogStore(directory)
        await logs.put_log("call-00", b"x")
        remount(directory, "ro")
        try:
            await logs.delete_logs(["call-100", "call-01"])  # call-00's shard; none
            with pytest.raises(StoreUnavailable, match="Read-only file system"):
                await logs.delete_logs(["call-100", "call-00"])
        finally:
            remount(directory, "rw")
        assert await logs.get_log("call-00") == b"x"
