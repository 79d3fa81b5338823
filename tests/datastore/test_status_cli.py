"""``fnq status``: queue, calls and live workers, against the embedded stores in tmp_path."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from config.domain import Call, CallStatus, Outcome, new_call_id
from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import open_queue
from tests.datastore.test_cli import into_closed_pipe
from tests.datastore.test_workers import INFO
from tests.rig import free_port
from worker.cli import cli
from worker.cli import status as status_module


def status(*args: str) -> str:
    out = CliRunner().invoke(cli, ["status", *args], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return out.output


def test_status_lists_live_workers(stores_env: Path) -> None:
    assert "no worker seen in the last 30 s" in status()
    assert json.loads(status("--json"))["workers"] == []

    async def populate() -> None:
        store = await open_datastore(load_settings())
        try:
            await store.record_queued(Call(new_call_id(), "shop", "resize"))
            await store.worker_heartbeat("w-busy", {**INFO, "host": "box-1", "pid": 10})
            await store.worker_heartbeat("w-idle", {"host": "box-2", "pid": 20})
            await store.worker_heartbeat("w-dead", {**INFO, "host": "box-3", "pid": 30})
        finally:
            await store.close()

    asyncio.run(populate())
    db = stores_env / "data" / "fnq.db"
    with sqlite3.connect(db) as conn:  # w-dead's last heartbeat was a minute ago (times: µs)
        conn.execute("UPDATE workers SET seen_at = seen_at - ? WHERE id = 'w-dead'", (60_000_000,))

    data = json.loads(status("--json"))
    assert set(data) == {"queue", "calls", "calls_cap", "calls_capped", "workers"}
    assert data["calls"]["queued"] == 1
    assert set(data["queue"]) == {"ready", "delayed", "reserved", "dead"}
    assert [(w["id"], w["host"], w["pid"]) for w in data["workers"]] == [
        ("w-busy", "box-1", 10),
        ("w-idle", "box-2", 20),
    ]
    busy = data["workers"][0]
    assert busy["info"] == INFO and 0 <= busy["seen_s_ago"] < 30
    assert busy["started_at"] and busy["seen_at"]

    lines = status().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    assert lines[header].split()[:4] == ["WORKER", "HOST", "PID", "MEMORY"]
    busy_row, idle_row = lines[header + 1].split(), lines[header + 2].split()
    assert busy_row[:7] == ["w-busy", "box-1", "10", "512/4096", "250/4000", "3", "2"]
    assert busy_row[7] == "5" and busy_row[-1] == "ago"
    assert idle_row[:8] == ["w-idle", "box-2", "20", "-", "-", "-", "-", "-"]
    assert "w-dead" not in "\n".join(lines)


def test_status_counts_a_status_up_to_a_cap_unless_told(
    stores_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting every call of a status reads all of them (millions); past the cap the
    count says "more than", and --exact counts them all."""
    monkeypatch.setattr(status_module, "STATUS_COUNT_CAP", 3)

    async def populate() -> None:
        store = await open_datastore(load_settings())
        try:
            for n in range(7):
                c = Call(new_call_id(), "shop", "resize")
                await store.record_queued(c)
                if n < 4:
                    await store.record_outcome(c, Outcome(CallStatus.SUCCESS), 1, "w")
        finally:
            await store.close()

    asyncio.run(populate())
    data = json.loads(status("--json"))
    assert (data["calls"]["success"], data["calls"]["queued"]) == (3, 3)
    assert (data["calls_cap"], data["calls_capped"]) == (3, ["success"])
    lines = status().splitlines()
    first = lines.index(next(line for line in lines if line.startswith("STATUS"))) + 1
    rows = dict(line.split(maxsplit=1) for line in lines[first : first + len(CallStatus)])
    assert (rows["success"], rows["queued"], rows["error"]) == ("more than 3", "3", "0")
    exact = json.loads(status("--exact", "--json"))
    assert (exact["calls"]["success"], exact["calls"]["queued"]) == (4, 3)
    assert (exact["calls_cap"], exact["calls_capped"]) == (None, [])


def test_status_into_a_closed_pipe_ends_quietly(stores_env: Path) -> None:
    assert into_closed_pipe("status") == (141, "")  # fnq status | head -1


def test_status_shows_the_queue_while_the_datastore_is_down(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def push() -> None:
        settings = load_settings()
        queue = open_queue(settings.mq_url, settings)
        try:
            await queue.push(Call(new_call_id(), "a", "f", b""))
        finally:
            await queue.close()

    asyncio.run(push())
    monkeypatch.setenv("FN_DB_URL", f"postgresql://fnq@127.0.0.1:{free_port()}/fnq")
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1
    assert ["ready", "1"] in [line.split() for line in out.stdout.splitlines()]
    assert out.stderr.startswith("fnq: cannot reach the PostgreSQL datastore")
    doc = CliRunner().invoke(cli, ["status", "--json"])
    assert doc.exit_code == 1
    shown = json.loads(doc.stdout)
    assert shown["queue"]["ready"] == 1 and "calls" not in shown
    assert shown["datastore_error"].startswith("cannot reach the PostgreSQL datastore")


def test_status_shows_calls_and_workers_while_the_queue_is_down(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def populate() -> None:
        store = await open_datastore(load_settings())
        try:
            await store.record_queued(Call(new_call_id(), "a", "f"))
            await store.worker_heartbeat("w-1", {**INFO, "host": "box-1", "pid": 10})
        finally:
            await store.close()

    asyncio.run(populate())
    monkeypatch.setenv("FN_MQ_URL", f"redis://127.0.0.1:{free_port()}/0")
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["queued", "1"] in rows and ["w-1", "box-1", "10"] in [r[:3] for r in rows]
    assert not any(r[:1] == ["QUEUE"] for r in rows)
    assert out.stderr.startswith("fnq: redis queue: ") and "Connection refused" in out.stderr
    doc = CliRunner().invoke(cli, ["status", "--json"])
    assert doc.exit_code == 1
    shown = json.loads(doc.stdout)
    assert "queue" not in shown and shown["calls"]["queued"] == 1
    assert [w["id"] for w in shown["workers"]] == ["w-1"]
    assert shown["queue_error"].startswith("redis queue: ")
