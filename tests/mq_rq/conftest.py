"""RQ interop fixtures: a flushed Redis DB (rq's key names are fixed) and an RQQueue on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis import Redis
from rq import Queue

from config.settings import load_settings
from mq.rq import RQQueue, open_rq_queues
from tests.rig import RedisServer

DB = 7  # other suites use db 0


@pytest.fixture
def rq_url(redis_server: RedisServer) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{DB}"


@pytest.fixture
def conn(rq_url: str) -> Iterator[Redis]:
    client = Redis.from_url(rq_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def rq_queue(conn: Redis) -> Queue:
    """The producer's queue, exactly as docs/rq.md shows it."""
    return Queue("default", connection=conn, serializer="json")


@pytest.fixture
async def make_rq(conn: Redis, rq_url: str) -> AsyncIterator[Callable[..., RQQueue]]:
    opened: list[RQQueue] = []

    def make(names: tuple[str, ...] = ("default",), **overrides: Any) -> RQQueue:
        queue = open_rq_queues(rq_url, names, load_settings(**overrides))
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.close()
