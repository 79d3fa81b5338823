"""SQLite: batches of only losable writes commit without waiting for the disk; the
writer thread's scheduling."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

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


async def test_outcomes_stay_durable_after_a_heartbeat(tmp_path: Path) -> None:
    """A heartbeat is written on its own, between two batches, with synchronous=NORMAL:
    the batches after it must still know to set FULL again."""
    settings = load_settings(data_dir=str(tmp_path), db_url=f"sqlite:///{tmp_path / 'fnq.db'}")
    store = await SqliteDatastore.open(settings, None)
    try:
        outcome = Outcome(status=CallStatus.SUCCESS, started_at=utcnow(), completed_at=utcnow())
        first = Call(new_call_id(), "a", "f", b"x")
        await store.record_outcome(first, outcome, 1, "w1")
        assert synchronous(store) == 2
        await store.worker_heartbeat("w1", {"pid": 1})
        assert synchronous(store) == 1  # NORMAL: a lost heartbeat comes again
        second = Call(new_call_id(), "a", "f", b"x")
        await store.record_outcome(second, outcome, 1, "w1")
        assert synchronous(store) == 2  # FULL again: this outcome is on disk before the ack
        await store.record_running(Call(new_call_id(), "a", "f", b"x"), 0, "w1")
        await store.worker_heartbeat("w1", {"pid": 1})
        await store.record_outcome(Call(new_call_id(), "a", "f", b"x"), outcome, 1, "w1")
        assert synchronous(store) == 2
    finally:
        await store.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_the_writer_thread_runs_under_sched_batch(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), db_url=f"sqlite:///{tmp_path / 's.db'}")
    store = await SqliteDatastore.open(settings, None)
    try:
        loop = asyncio.get_running_loop()
        writer = await loop.run_in_executor(store._writer_thread, os.sched_getscheduler, 0)
        reader = await loop.run_in_executor(store._reader_thread, os.sched_getscheduler, 0)
        assert writer == os.SCHED_BATCH
        assert reader == os.SCHED_OTHER  # only the writer: reads answer a waiting caller
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the event loop's thread
    finally:
        await store.close()
