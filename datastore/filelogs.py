"""Call logs as files: ``<dir>/<xy>/<call id>.log``, one per call.

``xy`` are the id's last two characters (random ones), which spreads files
over up to 1,024 directories. A log is written to a temporary file, flushed
to disk and renamed into place, so a reader sees either the old log or the
whole new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import aiofiles
import aiofiles.os

from datastore.errors import StoreError


class FileLogStore:
    def __init__(self, directory: str | Path) -> None:
        if not str(directory):
            raise StoreError("FN_LOG_URL=file:///DIR needs a directory")
        self.directory = Path(directory)

    def path_of(self, call_id: str) -> Path:
        if not call_id.isalnum() or len(call_id) < 2:
            raise StoreError(f"invalid call id {call_id!r}")
        return self.directory / call_id[-2:].lower() / f"{call_id}.log"

    async def put_log(self, call_id: str, data: bytes) -> None:
        path = self.path_of(call_id)
        await aiofiles.os.makedirs(path.parent, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        async with aiofiles.open(tmp, "wb") as out:
            await out.write(data)
            await out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        await aiofiles.os.replace(tmp, path)

    async def get_log(self, call_id: str) -> bytes | None:
        try:
            async with aiofiles.open(self.path_of(call_id), "rb") as src:
                return await src.read()
        except FileNotFoundError:
            return None

    async def delete_logs(self, call_ids: Sequence[str]) -> None:
        for call_id in call_ids:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self.path_of(call_id))

    async def close(self) -> None:
        return None
