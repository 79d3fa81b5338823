"""Run by test_postgres_partition on the far host: open the PostgreSQL datastore of
FN_DB_URL as a worker does (fnq's own pool and sessions), lock the record of the call
named on the command line inside a transaction, as a batch of record writes does
between its statements, say ``locked``, and wait to be killed."""

from __future__ import annotations

import asyncio
import sys

from config.settings import load_settings
from datastore.base import open_datastore
from datastore.postgres import PostgresDatastore

HOLD_S = 600.0


async def main(call_id: str) -> None:
    store = await open_datastore(load_settings())
    assert isinstance(store, PostgresDatastore)
    async with store._connection() as conn, conn.transaction():
        await conn.execute("UPDATE calls SET updated_at = now() WHERE id = $1", call_id)
        print("locked", flush=True)
        await asyncio.sleep(HOLD_S)  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
