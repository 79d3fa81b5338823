"""PostgreSQL: fnq's sessions, as the server sees them.

They carry the settings that let the server end one whose client is gone
(datastore.postgres, "A silent network"); an option of FN_DB_URL of the same
name wins.
"""

from __future__ import annotations

from pathlib import Path

from config.settings import load_settings
from datastore.base import open_datastore
from datastore.postgres import PostgresDatastore
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PostgresServer


async def _open(url: str, data: Path) -> PostgresDatastore:
    store = await open_datastore(load_settings(data_dir=data, db_url=url))
    assert isinstance(store, PostgresDatastore)
    return store


async def _setting(store: PostgresDatastore, name: str) -> str:
    async with store._connection() as conn:
        return str(await conn.fetchval(f"SHOW {name}"))


async def test_sessions_end_when_their_client_is_gone_unless_the_url_says_otherwise(
    postgres_server: PostgresServer, tmp_path: Path, settings_env: Path
) -> None:
    url = await fresh_pg_database(postgres_server)
    store = await _open(url, tmp_path / "data")
    try:
        assert await _setting(store, "idle_in_transaction_session_timeout") == "10s"
        assert await _setting(store, "tcp_keepalives_idle") == "10"
    finally:
        await store.close()
    store = await _open(f"{url}?idle_in_transaction_session_timeout=60000", tmp_path / "data")
    try:
        assert await _setting(store, "idle_in_transaction_session_timeout") == "1min"
        assert await _setting(store, "tcp_keepalives_count") == "3"
    finally:
        await store.close()
