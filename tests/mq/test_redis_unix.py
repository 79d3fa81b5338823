"""A Redis queue over a unix socket (``unix:///SOCKET?db=DB``): the same queue as
over TCP, on the server that socket belongs to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config.domain import Call, new_call_id
from config.errors import ConfigError
from config.settings import load_settings, mask_url
from mq.base import open_queue
from mq.errors import QueueUnavailable
from mq.rq import RQQueue
from tests.rig import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server with a password, so AUTH and SELECT go over the socket too."""
    server = RedisServer(tmp_path, extra=("--requirepass", "s3cret")).start()
    yield server
    server.stop()


async def test_calls_go_through_the_socket_to_its_server(locked_redis: RedisServer) -> None:
    url = f"unix://:s3cret@{locked_redis.socket}?db=3&prefix=sock"
    consumer = open_queue(url, load_settings())
    producer = open_queue(url, load_settings())
    try:
        waiting = asyncio.create_task(consumer.reserve(5.0))
        await asyncio.sleep(0.2)  # the consumer now blocks in its read
        call = Call(new_call_id(), "demo", "echo", b"over the socket")
        await producer.push(call)
        msg = await asyncio.wait_for(waiting, 5.0)
        assert msg is not None and msg.call.id == call.id and msg.call.body == b"over the socket"
        await consumer.ack(msg)
        assert (await consumer.stats()).ready == 0
    finally:
        await consumer.close()
        await producer.close()
    # Over TCP, the same server's database 3 holds that queue's keys: the socket
    # reached this server (not some other one on a default port), in that database.
    tcp = redis.Redis(port=locked_redis.port, db=3, password="s3cret")
    try:
        assert tcp.exists("sock:calls") and tcp.xlen("sock:ready:0") == 0
        assert not redis.Redis(port=locked_redis.port, db=0, password="s3cret").keys("sock:*")
    finally:
        tcp.close()


async def test_a_wrong_password_over_the_socket_is_refused(locked_redis: RedisServer) -> None:
    q = open_queue(f"unix://:wrong@{locked_redis.socket}?prefix=x&timeout_s=2", load_settings())
    try:
        with pytest.raises(QueueUnavailable, match="invalid username-password pair"):
            await q.push(Call(new_call_id(), "demo", "echo", b""))
    finally:
        await q.close()


def test_a_unix_url_needs_the_socket_path() -> None:
    for url in ("unix://", "unix:///", "unix://?db=0", "unix://run/redis.sock"):
        with pytest.raises(ConfigError, match="socket's absolute path and no host"):
            open_queue(url, load_settings())


def test_a_unix_url_takes_the_same_options() -> None:
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        open_queue("unix:///run/redis.sock?nope=1", load_settings())
    with pytest.raises(ConfigError, match="TLS option"):
        open_queue("unix:///run/redis.sock?ssl_ca_certs=/x", load_settings())


def test_a_unix_urls_password_is_masked() -> None:
    assert mask_url("unix://:pw@/run/redis.sock?db=1") == "unix://:***@/run/redis.sock?db=1"
    assert mask_url("unix:///run/redis.sock?password=pw") == "unix:///run/redis.sock?password=***"


async def test_rq_queues_over_the_socket(redis_server: RedisServer) -> None:
    queue = RQQueue.from_url(redis_server.unix_url, ["unixq"], load_settings())
    try:
        assert await queue.reserve(0.1) is None  # reached the server, nothing queued
    finally:
        await queue.close()


async def test_the_socket_is_reached_again_after_a_server_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True).start()
    queue = open_queue(f"{server.unix_url}&prefix=again&timeout_s=5", load_settings())
    try:
        first = Call(new_call_id(), "demo", "echo", b"before")
        await queue.push(first)
        server.restart()  # the same socket path; the queue's connections are dead
        second = Call(new_call_id(), "demo", "echo", b"after")
        for _ in range(50):  # the first use after the restart may find it still starting
            try:
                await queue.push(second)
                break
            except QueueUnavailable:
                await asyncio.sleep(0.1)
        got = []
        for _ in range(10):
            for msg in await queue.reserve_many(10, 1.0):
                got.append(msg.call.body)
                await queue.ack(msg)
            if len(got) == 2:
                break
        assert sorted(got) == [b"after", b"before"]
    finally:
        await queue.close()
        server.stop()
