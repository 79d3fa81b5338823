"""One transaction per batch on SQLite: a write that fails alone, and the sync pragma."""

from __future__ import annotations

from pathlib import Path

from config.domain import Function, utcnow
from datastore.backend import Write
from datastore.batch import Failed
from datastore.migrate import apply_sqlite
from datastore.rows import fn_row
from datastore.sqlite import connect, run_batch


def _fns(conn_path: Path) -> list[str]:
    conn = connect(conn_path, readonly=True)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM fns ORDER BY name")]
    finally:
        conn.close()


def _row(name: str, *, broken: bool = False) -> dict[str, object]:
    now = utcnow()
    row = fn_row(Function(app="demo", name=name, image="fnq/echo", created_at=now, updated_at=now))
    if broken:
        row["image"] = None  # NOT NULL: fails for good, not for a while
    return row


def test_a_batch_of_one_failing_write_is_rolled_back_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = connect(path)
    apply_sqlite(conn)
    results = run_batch(conn, [(Write.FN_INSERT, _row("bad", broken=True), None)], {})
    assert len(results) == 1 and isinstance(results[0], Failed)
    assert "NOT NULL" in str(results[0].error)
    assert not conn.in_transaction
    assert run_batch(conn, [(Write.FN_INSERT, _row("good"), None)], {}) == [True]
    conn.close()
    assert _fns(path) == ["good"]


def test_a_failing_write_in_a_batch_leaves_the_others(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = connect(path)
    apply_sqlite(conn)
    ops = [
        (Write.FN_INSERT, _row("a"), None),
        (Write.FN_INSERT, _row("b", broken=True), None),
        (Write.FN_INSERT, _row("c"), None),
    ]
    results = run_batch(conn, ops, {})
    assert [isinstance(r, Failed) for r in results] == [False, True, False]
    conn.close()
    assert _fns(path) == ["a", "c"]


def test_the_sync_pragma_is_sent_only_when_it_changes(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db.sqlite")
    apply_sqlite(conn)
    sent: list[str] = []
    conn.set_trace_callback(sent.append)
    state = {"synchronous": "FULL"}  # as connect() leaves it
    beat = {"id": "w1", "host": "h", "pid": 1, "now": 0, "info": "{}"}
    for ops in (
        [(Write.FN_INSERT, _row("a"), None)],  # FULL, as it is
        [(Write.FN_INSERT, _row("b"), None)],
        [(Write.WORKER_BEAT, beat, None)],  # losable: NORMAL
        [(Write.WORKER_BEAT, beat, None)],
        [(Write.FN_INSERT, _row("c"), None)],  # FULL again
    ):
        run_batch(conn, ops, state)
    pragmas = [s for s in sent if s.startswith("PRAGMA synchronous")]
    assert pragmas == ["PRAGMA synchronous = NORMAL", "PRAGMA synchronous = FULL"]
    assert not any(s.startswith("SAVEPOINT") for s in sent)  # batches of one
    conn.close()


def test_a_batch_runs_without_savepoints_until_a_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = connect(path)
    apply_sqlite(conn)
    sent: list[str] = []
    conn.set_trace_callback(sent.append)
    good = [(Write.FN_INSERT, _row(name), None) for name in ("a", "b", "c")]
    assert run_batch(conn, good, {}) == [True, True, True]
    assert not any(s.startswith("SAVEPOINT") for s in sent)
    assert [s for s in sent if s in ("BEGIN IMMEDIATE", "COMMIT")] == ["BEGIN IMMEDIATE", "COMMIT"]
    sent.clear()
    mixed = [(Write.FN_INSERT, _row("d"), None), (Write.FN_INSERT, _row("e", broken=True), None)]
    results = run_batch(conn, mixed, {})
    assert [isinstance(r, Failed) for r in results] == [False, True]
    # The whole batch was undone, then run again a savepoint per write.
    assert sent.index("ROLLBACK") < sent.index("SAVEPOINT op")
    assert sent.count("BEGIN IMMEDIATE") == 2 and sent.count("COMMIT") == 1
    assert not conn.in_transaction
    conn.close()
    assert _fns(path) == ["a", "b", "c", "d"]
