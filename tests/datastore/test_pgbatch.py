"""Batches of call writes: same results as one write at a time, few statements on PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from config.domain import Call, CallStatus, Outcome, Response, new_call_id, utcnow
from config.errors import StoreError
from datastore import pgbatch
from datastore.backend import Write
from datastore.common import SqlDatastore
from datastore.postgres import PostgresDatastore
from tests.datastore.conftest import MakeStore

pytestmark = pytest.mark.integration


def call() -> Call:
    return Call(new_call_id(), "app", "fn", b"{}")


def done(body: bytes = b"ok", log: bytes = b"log\n", error: str | None = None) -> Outcome:
    now = utcnow()
    status = CallStatus.SUCCESS if error is None else CallStatus.ERROR
    return Outcome(status, response=Response(200, body=body), log=log, error=error,
                   started_at=now, completed_at=now)  # fmt: skip


def ops_for(store: SqlDatastore, calls: list[Call], kinds: str) -> list[pgbatch.Op]:
    """Synthetic batch: for each call, ``kinds`` ('q' queued, 'r' running, 'f' finish)."""
    ops: list[pgbatch.Op] = []
    for c in calls:
        for k in kinds:
            if k == "q":
                ops.append((Write.QUEUED, store._queued_params(c, None), None))
            elif k in "rR":
                ops.append((Write.RUNNING, store._running_params(c, int(k == "r"), "w"), None))
            else:
                row, log = store._outcome_row(
                    c, done(), 1, "w", CallStatus.SUCCESS, with_request=False
                )
                ops.append((Write.FINISH, row, log))
    return ops


def test_rounds_keep_one_write_per_call_and_order() -> None:
    a, b = "call-a", "call-b"

    def op(kind: Write, call_id: str, attempt: int = 1) -> pgbatch.Op:
        return (kind, {"id": call_id, "attempt_arg": attempt}, None)

    ops = [op(Write.RUNNING, a), op(Write.RUNNING, b, 0), op(Write.FINISH, a),
           op(Write.FINISH, b), op(Write.FINISH, a)]  # fmt: skip
    assert pgbatch.rounds(range(len(ops)), ops) == [
        {(Write.RUNNING, True): [0], (Write.RUNNING, False): [1]},
        {(Write.FINISH, False): [2, 3]},
        {(Write.FINISH, False): [4]},
    ]
    assert pgbatch.statements(ops) == 4
    many = [op(Write.FINISH, new_call_id()) for _ in range(500)]
    assert pgbatch.statements(many) == 1
    assert pgbatch.statements([*many, (Write.CANCEL, {"id": a}, None)]) == 2


async def test_mixed_batch_keeps_order_per_call(store: SqlDatastore) -> None:
    calls = [call() for _ in range(30)]
    out = done(b"done")

    async def lifecycle(c: Call, attempt: int) -> tuple[Any, ...]:
        # not awaited one by one: all three land in the same batches
        return tuple(await asyncio.gather(
            store.record_queued(c, "img:1"),
            store.record_running(c, attempt, "w"),
            store.record_outcome(c, out, 1, "w"),
            store.record_outcome(c, done(b"late"), 2, "w2"),
        ))  # fmt: skip

    results = await asyncio.gather(*(lifecycle(c, i % 2) for i, c in enumerate(calls)))
    for c, (_, running, won, late) in zip(calls, results, strict=True):
        assert running.status is CallStatus.RUNNING and running.attempts == 1
        assert (won, late) == (True, False)
        rec = await store.get_call(c.id)
        assert rec is not None and rec.status is CallStatus.SUCCESS
        assert (rec.response_body, rec.image, rec.worker_id) == (b"done", "img:1", "w")
        assert await store.get_log(c.id) == b"log\n"


async def test_running_on_final_calls_returns_them_untouched(store: SqlDatastore) -> None:
    calls = [call() for _ in range(10)]
    await asyncio.gather(*(store.record_outcome(c, done(), 1, "w1") for c in calls[:5]))
    recs = await asyncio.gather(*(store.record_running(c, 0, "w2") for c in calls))
    assert [r.status for r in recs] == [CallStatus.SUCCESS] * 5 + [CallStatus.RUNNING] * 5
    assert {r.worker_id for r in recs[:5]} == {"w1"}
    again = await asyncio.gather(*(store.record_running(c, 0, "w3") for c in calls[5:]))
    assert [r.attempts for r in again] == [2] * 5  # attempt 0: the stored count plus one


# ------------------------------------------------------------- PostgreSQL only


only_postgres = pytest.mark.parametrize("backend", ["postgres"])


@pytest.fixture
async def pg(make_store: MakeStore) -> PostgresDatastore:
    store = await make_store()
    assert isinstance(store, PostgresDatastore)
    return store


@only_postgres
async def test_a_batch_costs_one_statement_per_kind(
    pg: PostgresDatastore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    real_run = pgbatch.run

    class Counting:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
            sent.append(query)
            return await self._conn.execute(query, *args, **kw)

        async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
            sent.append(query)
            return await self._conn.fetch(query, *args, **kw)

    async def counting_run(conn: Any, *args: Any) -> list[Any]:
        return await real_run(Counting(conn), *args)

    monkeypatch.setattr(pgbatch, "run", counting_run)
    calls = [call() for _ in range(200)]
    results = await pg._run_batch(ops_for(pg, calls, "qrf"))
    assert len(sent) == 3  # queued, running, finish: whatever the batch size
    assert results[2::3] == [True] * 200
    assert [r["status"] for r in results[1::3]] == ["running"] * 200
    stored = await pg.get_call(calls[-1].id)  # the request rode in the queued statement
    assert stored is not None and stored.request_body == b"{}"

    sent.clear()
    results = await pg._run_batch(ops_for(pg, calls, "Rf"))  # again: all final already
    assert len(sent) == 3  # running, a read of the rows it left alone, finish
    assert results[1::2] == [False] * 200
    assert {r["status"] for r in results[0::2]} == {"success"}


@only_postgres
async def test_a_refused_write_fails_alone(pg: PostgresDatastore) -> None:
    calls = [call() for _ in range(6)]
    bad = calls[3]
    results = await asyncio.gather(
        *(pg.record_outcome(c, done(), 2**31 if c is bad else 1, "w")  # integer out of range
          for c in calls),
        return_exceptions=True,
    )  # fmt: skip
    assert isinstance(results[3], StoreError)
    assert [r for i, r in enumerate(results) if i != 3] == [True] * 5
    counts = await pg.count_by_status()
    assert counts[CallStatus.SUCCESS] == 5 and counts[CallStatus.ERROR] == 0


@only_postgres
async def test_a_batch_of_large_outcomes_is_bounded_in_bytes(
    pg: PostgresDatastore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes near FN_MAX_RESPONSE_SIZE and FN_MAX_LOG_SIZE_BYTES go in batches of a
    few MiB: one statement holding hundreds of them could not reach the server within
    the statement timeout, and would time out again on every try."""
    sizes: list[int] = []
    real_run = pgbatch.run

    async def measuring_run(conn: Any, ops: list[pgbatch.Op], *args: Any) -> list[Any]:
        sizes.append(sum(len(log or b"") + len(p.get("response_body") or b"")
                         for _, p, log in ops))  # fmt: skip
        return await real_run(conn, ops, *args)

    monkeypatch.setattr(pgbatch, "run", measuring_run)
    mib = 1024 * 1024
    big = done(body=b"b" * mib, log=b"l" * mib)
    calls = [call() for _ in range(40)]
    assert await asyncio.gather(*(pg.record_outcome(c, big, 1, "w") for c in calls)) == [True] * 40
    assert sum(sizes) == 80 * mib
    assert max(sizes) <= 16 * mib, sizes
    stored = await pg.get_call(calls[-1].id)
    assert stored is not None and stored.response_body == b"b" * mib
