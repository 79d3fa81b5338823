"""Several processes' connections opening one fresh SQLite file at once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from config.sqlite import enable_wal


def _open_all(path: Path, n: int) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def opener() -> None:
        conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
        try:
            start.wait(timeout=5)
            enable_wal(conn, 5.0)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            assert mode == "wal"
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return errors


def test_concurrent_openers_of_a_fresh_file_all_get_wal(tmp_path: Path) -> None:
    for round_ in range(25):
        errors = _open_all(tmp_path / f"db{round_}.sqlite", 6)
        assert errors == []


def test_a_lock_held_past_the_timeout_still_fails(tmp_path: Path) -> None:
    path = tmp_path / "held.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        try:
            enable_wal(other, 0.05)
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
        else:
            raise AssertionError("enable_wal succeeded while another connection held the lock")
    finally:
        holder.execute("ROLLBACK")
        other.close()
        holder.close()
