"""Session-wide engines. Import what you need from tests.rig for your own."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from config.settings import load_settings
from datastore.base import open_datastore
from mq.base import open_queue
from tests.rig import PostgresServer, RedisServer, docker_client, pg_tempdir

# Property tests: the same examples on every run, no time limit per example, no
# example database on disk. Each test file stays within a few seconds. Hypothesis'
# own caches go to the temporary directory, not into the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "fnq-hypothesis")
)
settings.register_profile("fnq", derandomize=True, deadline=None, database=None)
settings.load_profile("fnq")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(pg_tempdir(tmp_path_factory.mktemp("postgres"))).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[object]:
    yield from docker_client()


@pytest.fixture
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FN_DATA_DIR at a fresh directory and clear other FN_ variables."""
    for key in list(os.environ):
        if key.startswith("FN_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FN_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture
def stores_env(settings_env: Path) -> Path:
    """settings_env with its SQLite datastore and queue made, as a worker makes them:
    commands that only read find them."""

    async def make() -> None:
        settings = load_settings()
        await (await open_datastore(settings)).close()
        queue = open_queue(settings.mq_url, settings)
        try:
            await queue.stats()
        finally:
            await queue.close()

    asyncio.run(make())
    return settings_env
