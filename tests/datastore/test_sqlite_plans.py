"""SQLite: the statements of routine reads and writes go through indexes.

SQLite keeps no statistics unless someone runs ANALYZE, so it picks among
indexes by their shape alone; these tests read the plans it makes for the
statements a store runs, on a database of this release's schema (the plans
do not depend on the rows).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from config.domain import CallStatus, utcnow
from config.settings import load_settings
from datastore.base import CallFilter, encode_cursor, open_datastore
from datastore.sqlite import SqliteDatastore


@pytest.fixture
async def lite(tmp_path: Path) -> Any:
    db = tmp_path / "fnq.db"
    store = await open_datastore(load_settings(data_dir=tmp_path, db_url=f"sqlite:///{db}"))
    assert isinstance(store, SqliteDatastore)
    yield store
    await store.close()


@contextmanager
def traced(*conns: sqlite3.Connection | None) -> Iterator[list[str]]:
    """The statements run on ``conns`` meanwhile, their parameters filled in."""
    seen: list[str] = []
    for conn in conns:
        assert conn is not None
        conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        for conn in conns:
            assert conn is not None
            conn.set_trace_callback(None)


def plan(store: SqliteDatastore, statement: str) -> list[str]:
    """The lines of EXPLAIN QUERY PLAN for ``statement`` (parameters filled in)."""
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement)]
    finally:
        conn.close()


async def plans_of(
    store: SqliteDatastore, work: Callable[[], Awaitable[object]], starts: str
) -> list[list[str]]:
    """The plans of the statements beginning with ``starts`` that ``work`` runs."""
    with traced(store._wconn, store._rconn, store._qconn) as seen:
        await work()
    found = [plan(store, s) for s in seen if s.lstrip().upper().startswith(starts)]
    assert found, seen
    return found


async def test_a_purge_chunk_reads_the_completion_index(lite: SqliteDatastore) -> None:
    """Each chunk of ``fnq calls purge`` finds its calls through ``completed_at``: through
    the status index it read every ended call of the table, and sorted them, per chunk."""
    for steps in await plans_of(lite, lambda: lite.purge_calls(timedelta(days=1)), "DELETE"):
        assert any("USING INDEX calls_by_completion (completed_at<?)" in s for s in steps), steps
        assert not any("TEMP B-TREE" in s or "calls_by_status" in s for s in steps), steps


async def test_a_page_of_one_app_reads_its_calls_in_order(lite: SqliteDatastore) -> None:
    """``fnq calls list --app APP``: through calls_by_fn (app, fn, ...) SQLite sorted
    every call of the app to return the newest 30."""
    page = (lambda: lite.list_calls(CallFilter(app="shop")), "SELECT")
    for steps in await plans_of(lite, *page):
        assert steps == ["SEARCH calls USING INDEX calls_by_app (app=?)"], steps


async def test_a_page_of_unindexed_filters_walks_one_index(lite: SqliteDatastore) -> None:
    """``--app`` with ``--status``: the page walks the app's index (and checks the status
    of each call it reads), in order, bounded by the time of its last call."""
    f = CallFilter(app="shop", status=CallStatus.ERROR, cursor=encode_cursor(utcnow(), "z"))
    for steps in await plans_of(lite, lambda: lite.list_calls(f), "SELECT"):
        assert len(steps) == 1 and re.fullmatch(
            r"SEARCH calls USING (COVERING )?INDEX calls_by_app \(app=\? AND created_at<\?\)",
            steps[0],
        ), steps


async def test_capped_counts_walk_the_status_index(lite: SqliteDatastore) -> None:
    """``fnq status``: each status's count reads its own calls in the status index, up to
    the cap; a count of the whole table read every call."""
    plans = await plans_of(lite, lambda: lite.count_by_status(at_most=100), "SELECT")
    steps = [s for p in plans for s in p if " calls " in s]  # not the subqueries' own scans
    assert len(steps) == len(CallStatus), steps
    assert all(s.endswith("USING COVERING INDEX calls_by_status (status=?)") for s in steps), steps
