"""Datastores to test against: SQLite in a temporary directory and PostgreSQL.

Each PostgreSQL test gets a database of its own on the session's server.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from config.settings import Settings, load_settings
from datastore.base import open_datastore
from datastore.common import SqlDatastore
from tests.rig import PostgresServer

BACKENDS = ["sqlite", "postgres"]


async def fresh_pg_database(server: PostgresServer) -> str:
    """Create an empty database on ``server`` and return its URL."""
    name = "t_" + secrets.token_hex(6)
    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        await conn.execute(f"CREATE DATABASE {name}", timeout=30)
    finally:
        await conn.close(timeout=10)
    return server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(backend: str, settings_env: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{settings_env / 'data' / 'fnq.db'}"
    server = request.getfixturevalue("postgres_server")
    return await fresh_pg_database(server)


MakeStore = Callable[..., Awaitable[SqlDatastore]]


@pytest.fixture
async def make_store(db_url: str, settings_env: Path) -> AsyncIterator[MakeStore]:
    """Open stores on the test's database (settings overridable); all closed at the end."""
    opened: list[SqlDatastore] = []

    async def make(**overrides: Any) -> SqlDatastore:
        settings: Settings = load_settings(
            **{"data_dir": settings_env / "data", "db_url": db_url, **overrides}
        )
        store = await open_datastore(settings)
        assert isinstance(store, SqlDatastore)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> SqlDatastore:
    return await make_store()
