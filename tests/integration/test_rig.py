"""The engines the other integration tests rely on really answer."""

from __future__ import annotations

import subprocess

import asyncpg
import docker
import pytest

from tests.rig import PostgresServer, RedisServer

pytestmark = pytest.mark.integration


def test_redis_answers(redis_server: RedisServer) -> None:
    out = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "PING"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "PONG"


async def test_postgres_answers(postgres_server: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_server.url)
    try:
        assert await conn.fetchval("SELECT 40 + 2") == 42
    finally:
        await conn.close()


def test_docker_engine_answers(docker_engine: object) -> None:
    assert isinstance(docker_engine, docker.DockerClient)
    assert docker_engine.version()["ApiVersion"]
