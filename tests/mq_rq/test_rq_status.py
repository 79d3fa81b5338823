"""``fnq status`` with RQ queues bridged (FN_RQ_QUEUES): each queue's jobs as rq counts them."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from redis import Redis
from rq import Queue

from config.settings import load_settings
from mq.rq import open_rq_queues
from tests.rig import free_port
from worker.cli import cli

pytestmark = pytest.mark.integration


@pytest.fixture
def bridged(stores_env: Path, monkeypatch: pytest.MonkeyPatch, rq_url: str) -> str:
    monkeypatch.setenv("FN_RQ_QUEUES", "default,low")
    monkeypatch.setenv("FN_RQ_URL", rq_url)
    return rq_url


def hold_and_fail_one(url: str) -> None:
    """A worker's doing on queue ``low``: one job started (held), one failed."""

    async def run() -> None:
        queue = open_rq_queues(url, ["low"], load_settings())
        try:
            failing = await queue.reserve(1.0)
            assert failing is not None
            await queue.dead_letter(failing, "gave up")
            assert await queue.reserve(1.0) is not None  # held: started in rq
        finally:
            await queue.close()

    asyncio.run(run())


def test_status_shows_each_rq_queue(bridged: str, conn: Redis, rq_queue: Queue) -> None:
    for body in ("a", "b"):
        rq_queue.enqueue("fnq.call", app="demo", fn="echo", body=body)
    rq_queue.enqueue_in(timedelta(seconds=60), "fnq.call", app="demo", fn="echo")
    low = Queue("low", connection=conn, serializer="json")
    for body in ("c", "d"):
        low.enqueue("fnq.call", app="demo", fn="echo", body=body)
    hold_and_fail_one(bridged)

    doc = CliRunner().invoke(cli, ["status", "--json"])
    assert doc.exit_code == 0, doc.output
    data = json.loads(doc.stdout)
    assert data["rq_queues"] == [
        {"name": "default", "queued": 2, "scheduled": 1, "started": 0, "failed": 0},
        {"name": "low", "queued": 0, "scheduled": 0, "started": 1, "failed": 1},
    ]
    assert data["queue"]["ready"] == 0 and "calls" in data

    text = CliRunner().invoke(cli, ["status"])
    assert text.exit_code == 0, text.output
    rows = [line.split() for line in text.stdout.splitlines()]
    start = rows.index(["RQ", "QUEUE", "QUEUED", "SCHEDULED", "STARTED", "FAILED"])
    assert rows[start + 1 : start + 4] == [["default", "2", "1", "0", "0"],
                                           ["low", "0", "0", "1", "1"], []]  # fmt: skip


def test_status_without_its_rq_redis_shows_the_rest_then_the_error(
    stores_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_RQ_QUEUES", "default")
    monkeypatch.setenv("FN_RQ_URL", f"redis://127.0.0.1:{free_port()}/0")
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1
    lines = [line.split() for line in out.stdout.splitlines()]
    assert ["ready", "0"] in lines and ["queued", "0"] in lines  # queue and calls
    assert out.stderr.startswith("fnq: rq queue: ") and out.stderr.count("\n") == 1
    doc = CliRunner().invoke(cli, ["status", "--json"])
    assert doc.exit_code == 1
    shown = json.loads(doc.stdout)
    assert "rq_queues" not in shown and shown["rq_error"].startswith("rq queue: ")
    assert shown["calls"]["queued"] == 0
