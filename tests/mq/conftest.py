"""Queues for the contract tests: every test runs once on SQLite and once on Redis."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import Settings, load_settings
from mq.base import MessageQueue, open_queue
from tests.rig import RedisServer

BACKENDS = ["sqlite", "redis"]


@dataclass
class QueueMaker:
    """Opens queues on one shared store (one SQLite file or one Redis key prefix)."""

    backend: str
    url: str
    prefix: str = ""
    redis_port: int = 0
    opened: list[MessageQueue] = field(default_factory=list)

    def __call__(self, **overrides: Any) -> MessageQueue:
        queue = open_queue(self.url, self.settings(**overrides))
        self.opened.append(queue)
        return queue

    @staticmethod
    def settings(**overrides: Any) -> Settings:
        return load_settings(**overrides)

    def inject_raw(self, fields: dict[str, bytes], *, msg_id: str = "", priority: int = 0) -> None:
        """Add a message the way a foreign producer would, bypassing all checks."""
        if self.backend == "redis":
            client = redis.Redis(port=self.redis_port)
            try:
                client.xadd(f"{self.prefix}:calls", fields)  # type: ignore[arg-type]
            finally:
                client.close()
            return
        payload = fields.get("payload", b"")
        with sqlite3.connect(self.url.removeprefix("sqlite://")) as conn:
            conn.execute(
                "INSERT INTO mq_message (id, priority, payload) VALUES (?, ?, ?)",
                (msg_id or secrets.token_hex(6), priority, payload),
            )


def make_url(backend: str, tmp_path: Path, server: RedisServer | None) -> tuple[str, str]:
    if backend == "sqlite":
        return f"sqlite://{tmp_path / 'mq.db'}", ""
    assert server is not None
    prefix = f"t{secrets.token_hex(4)}"
    return f"{server.url}?prefix={prefix}", prefix


@pytest.fixture(params=BACKENDS)
async def queues(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueMaker]:
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
    url, prefix = make_url(request.param, tmp_path, server)
    maker = QueueMaker(request.param, url, prefix, server.port if server else 0)
    yield maker
    for queue in maker.opened:
        await queue.close()


@pytest.fixture
def make_queue(queues: QueueMaker) -> Callable[..., MessageQueue]:
    return queues
