"""SQLite: batches of only losable writes commit without waiting for the disk."""

from __future__ import annotations

from pathlib import Path

from config.domain import Call, CallStatus, Outcome, new_call_id, utcnow
from config.settings import load_settings
from datastore.sqlite import SqliteDatastore


def synchronous(store: SqliteDatastore) -> int:
    assert store._wconn is not None
    return int(store._wconn.execute("PRAGMA synchronous").fetchone()[0])


async def test_running_marks_are_relaxed_and_outcomes_durable(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), db_url=f"sqlite:///{tmp_path / 'fnq.db'}")
    store = await SqliteDatastore.open(settings, None)
    try:
        call = Call(new_call_id(), "a", "f", b"x")
        await store.record_running(call, 0, "w1")
        assert synchronous(store) == 1  # NORMAL: a lost mark is written again on redelivery
        outcome = Outcome(status=CallStatus.SUCCESS, started_at=utcnow(), completed_at=utcnow())
        await store.record_outcome(call, outcome, 1, "w1")
        assert synchronous(store) == 2  # FULL: the outcome is on disk before the ack
        rec = await store.get_call(call.id)
        assert rec is not None and rec.status is CallStatus.SUCCESS
    finally:
        await store.close()
