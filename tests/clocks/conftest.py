"""Hosts whose clocks disagree: real `fnq` processes with their wall clock off.

A process started with ``skewed(env, seconds)`` reads a wall clock that many seconds
off (tests/clocks/skewed/sitecustomize.py), as a worker on another host may; its
monotonic clock, Redis's and PostgreSQL's clocks are the true ones. The containers
it starts read the true clock too: a skewed worker's `Fn-Deadline` header is off
by its skew, which the test functions do not read.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from config.domain import new_call_id
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PostgresServer, RedisServer
from tests.worker.conftest import Cluster, base_env, images, sqlite_cluster

__all__ = ["images", "sqlite_cluster"]  # fixtures

SKEWED = Path(__file__).resolve().parent / "skewed"


def skewed(
    env: dict[str, str], skew_s: float, *, step_s: float = 0.0, step_file: Path | None = None
) -> dict[str, str]:
    """``env`` for a process whose wall clock is ``skew_s`` off (ahead when positive),
    and steps by ``step_s`` more once ``step_file`` exists."""
    out = dict(env)
    path = [str(SKEWED), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    out["PYTHONPATH"] = os.pathsep.join(path)
    out["FNQ_TEST_CLOCK_SKEW_S"] = str(skew_s)
    if step_file is not None:
        out["FNQ_TEST_CLOCK_STEP_S"] = str(step_s)
        out["FNQ_TEST_CLOCK_STEP_FILE"] = str(step_file)
    return out


@pytest.fixture
async def hosts(
    tmp_path: Path, redis_server: RedisServer, postgres_server: PostgresServer, images: None
) -> AsyncIterator[Cluster]:
    """Workers of many hosts: one Redis queue and one PostgreSQL datastore, short
    reservations (a stopped worker's calls come back within 2 s), no pauses."""
    prefix = f"k{new_call_id()[-8:].lower()}"
    db_url = await fresh_pg_database(postgres_server)
    env = base_env(tmp_path, f"{redis_server.url}?prefix={prefix}", db_url)
    env.update({"FN_MQ_RESERVATION_MSECS": "2000", "FN_FREEZE_IDLE_MSECS": "-1"})
    cluster = Cluster(env, tmp_path)
    yield cluster
    cluster.tear_down()
