"""open_queue's URL handling and the cancellation guard, without any engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from config.domain import Call
from config.errors import ConfigError
from config.settings import load_settings
from mq.base import Message, claim_shielded, open_queue
from mq.redis import RedisQueue
from mq.sqlite import SqliteQueue


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported queue URL"):
        open_queue("amqp://localhost", load_settings())


def test_sqlite_url_names_an_absolute_path(tmp_path: Path) -> None:
    queue = open_queue(f"sqlite://{tmp_path}/q.db", load_settings())
    assert isinstance(queue, SqliteQueue) and queue.path == tmp_path / "q.db"
    with pytest.raises(ConfigError):
        open_queue("sqlite://host/q.db", load_settings())


async def test_redis_url_options() -> None:
    queue = open_queue("redis://127.0.0.1:1/0?prefix=abc&timeout_s=3", load_settings())
    assert isinstance(queue, RedisQueue) and queue.inbox_key == "abc:calls"
    await queue.close()  # never connected: nothing to say goodbye to
    with pytest.raises(ConfigError, match="timeout_s"):
        open_queue("redis://127.0.0.1:1/0?timeout_s=soon", load_settings())


async def test_messages_claimed_during_cancellation_are_handed_back() -> None:
    msg = Message(Call(id="c1", app="a", fn="f"), 1, "r1")
    claimed = asyncio.Event()
    handed_back: list[Message] = []

    async def claim() -> list[Message]:
        await claimed.wait()  # the backend is still handing out when the caller gives up
        return [msg]

    async def hand_back(msgs: list[Message]) -> None:
        handed_back.extend(msgs)

    task = asyncio.create_task(claim_shielded(claim(), hand_back, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    claimed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handed_back == [msg]
