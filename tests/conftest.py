"""Session-wide engines. Import what you need from tests.rig for your own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import PostgresServer, RedisServer, docker_client, pg_tempdir


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
