"""SQLite: a call's record is read on the event loop, or by the reader thread when
SQLite would make that read wait."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from config.domain import Call, CallStatus, new_call_id
from config.settings import load_settings
from datastore.sqlite import SqliteDatastore


class BusyConnection:
    """Answers every statement as a locked database would."""

    def __init__(self) -> None:
        self.tried = 0

    def execute(self, *_args: Any) -> Any:
        self.tried += 1
        raise sqlite3.OperationalError("database is locked")


async def test_point_reads_stay_on_the_loop_and_fall_back_when_busy(tmp_path: Path) -> None:
    settings = load_settings(data_dir=str(tmp_path), db_url=f"sqlite:///{tmp_path / 'fnq.db'}")
    store = await SqliteDatastore.open(settings, None)
    try:
        call = Call(new_call_id(), "a", "f", b"x")
        await store.record_running(call, 0, "w1")
        threads: list[str] = []
        assert store._qconn is not None
        store._qconn.set_trace_callback(lambda _: threads.append(threading.current_thread().name))
        rec = await store.get_call(call.id)
        assert rec is not None and rec.status is CallStatus.RUNNING
        assert threads and set(threads) == {threading.main_thread().name}

        quick, busy = store._qconn, BusyConnection()
        store._qconn = busy  # type: ignore[assignment]
        try:
            rec = await store.get_call(call.id)
        finally:
            store._qconn = quick
        assert busy.tried == 1 and rec is not None and rec.id == call.id
    finally:
        await store.close()
