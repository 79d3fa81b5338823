"""SQLite only: rows that other programs insert into ``mq_message`` (docs/queue.md)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from config.settings import load_settings
from mq.base import QueueStats, open_queue
from mq.sqlite import SqliteQueue


async def test_rows_of_other_programs(tmp_path: Path) -> None:
    """A row's payload must be JSON text of a call with the row's own id; a payload
    without ``created`` was made about when it is first taken."""
    url = f"sqlite://{tmp_path / 'mq.db'}"
    q = open_queue(url, load_settings())
    try:
        await q.stats()  # creates the tables
        rows = [
            ("n1", 42),  # SQLite keeps a number as a number: once a TypeError that stopped
            ("n2", 1.5),  # the consumer, again at every reserve
            ("n3", '{"id":"other","app":"a","fn":"f"}'),  # acks went by the payload's id
            ("good", '{"id":"good","app":"a","fn":"f","body":"x"}'),
        ]
        with sqlite3.connect(tmp_path / "mq.db") as conn:
            conn.executemany(
                "INSERT INTO mq_message (id, priority, payload) VALUES (?, 0, ?)", rows
            )
        before = datetime.now(UTC).replace(microsecond=0)
        msg = await q.reserve(2.0)
        assert msg is not None and (msg.call.id, msg.call.body) == ("good", b"x")
        # not 1970: a function's max_age_s would have cancelled it as expired
        assert before <= msg.call.created_at <= datetime.now(UTC)
        await q.ack(msg)
        assert await q.reserve(0.1) is None
        dead = {d.id: d.reason for d in await q.dead_list()}
        assert dead == {
            "n1": "malformed message: payload must be JSON text, not int 42",
            "n2": "malformed message: payload must be JSON text, not float 1.5",
            "n3": "malformed message: payload id 'other' is not the row's id 'n3'",
        }
        assert (await q.stats()).dead == 3
    finally:
        await q.close()


async def test_a_row_whose_id_is_a_blob_is_dead_under_a_text_id(tmp_path: Path) -> None:
    """A row of another program whose ``id`` is a BLOB is malformed; its dead letter goes
    by the id as text (bytes that are not UTF-8 as ``\\xNN``), which ``dead requeue`` and
    ``dead purge`` take. Requeued, it is a row with a text id, and runs."""
    url = f"sqlite://{tmp_path / 'mq.db'}"
    q = open_queue(url, load_settings())
    try:
        await q.stats()  # creates the tables
        rows = [
            (b"blob-1", '{"id":"blob-1","app":"a","fn":"f","body":"x"}'),
            (b"blob-\xff", '{"id":"blob-2","app":"a","fn":"f"}'),
        ]
        with sqlite3.connect(tmp_path / "mq.db") as conn:
            conn.executemany(
                "INSERT INTO mq_message (id, priority, payload) VALUES (?, 0, ?)", rows
            )
        assert await q.reserve(0.1) is None
        dead = {d.id: d.reason for d in await q.dead_list()}
        assert dead == {
            "blob-1": "malformed message: the row's id b'blob-1' is a BLOB, not text",
            "blob-\\xff": "malformed message: the row's id b'blob-\\xff' is a BLOB, not text",
        }
        assert q.take_buried() == []  # no call id to end a record of
        assert await q.dead_purge(["blob-\\xff"]) == 1
        assert await q.dead_requeue(["blob-1"]) == 1
        msg = await q.reserve(2.0)
        assert msg is not None and (msg.call.id, msg.call.body) == ("blob-1", b"x")
        await q.ack(msg)
        assert await q.stats() == QueueStats(0, 0, 0, 0)
    finally:
        await q.close()


async def test_the_depth_is_counted_in_indexes(tmp_path: Path) -> None:
    """``fnq status`` and the worker's queue gauges (every 5 s): a count over the table
    read every payload of a deep queue (75 ms for 500,000 messages against 5 ms)."""
    path = tmp_path / "mq.db"
    q = open_queue(f"sqlite://{path}", load_settings())
    try:
        await q.stats()  # creates the tables
        assert isinstance(q, SqliteQueue)
        seen: list[str] = []
        q._db.conn.set_trace_callback(seen.append)
        await q.stats()
        q._db.conn.set_trace_callback(None)
    finally:
        await q.close()
    assert seen
    with sqlite3.connect(path) as conn:
        steps = [r[3] for s in seen for r in conn.execute("EXPLAIN QUERY PLAN " + s)]
    read = [s for s in steps if " mq_message" in s]
    assert read and all("USING COVERING INDEX" in s or "USING INDEX" in s for s in read), steps
