"""open_queue's URL handling and the cancellation guard, without any engine."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

import mq.resp
from config.domain import Call
from config.errors import ConfigError, QueueError
from config.settings import load_settings
from mq.base import Burials, Message, claim_shielded, open_queue
from mq.redis import RedisQueue
from mq.redis_url import url_options
from mq.sqlite import SqliteQueue
from worker.cli import cli


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported queue URL"):
        open_queue("amqp://localhost", load_settings())


async def test_sqlite_queue_whose_directory_cannot_be_made_is_a_queue_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")  # a file where the directory would be
    queue = open_queue(f"sqlite://{tmp_path}/file/q.db", load_settings())
    try:
        with pytest.raises(QueueError, match="cannot make the queue's directory"):
            await queue.push(Call("c1", "demo", "echo"))
    finally:
        await queue.close()


def test_sqlite_url_names_an_absolute_path(tmp_path: Path) -> None:
    queue = open_queue(f"sqlite://{tmp_path}/q.db", load_settings())
    assert isinstance(queue, SqliteQueue) and queue.path == tmp_path / "q.db"
    for url in ("sqlite://host/q.db", "sqlite:///", "sqlite:////"):
        with pytest.raises(ConfigError, match="a SQLite URL looks like"):
            open_queue(url, load_settings())


@pytest.mark.parametrize("tail", ["?mode=ro", "#part"])
def test_sqlite_queue_url_takes_no_options(tmp_path: Path, tail: str) -> None:
    with pytest.raises(ConfigError, match="a SQLite URL takes no options"):
        open_queue(f"sqlite://{tmp_path}/q.db{tail}", load_settings())
    queue = open_queue(f"sqlite://{tmp_path}/q%3Fx.db", load_settings())
    assert isinstance(queue, SqliteQueue) and queue.path == tmp_path / "q?x.db"


async def test_redis_url_options() -> None:
    queue = open_queue("redis://127.0.0.1:1/0?prefix=abc&timeout_s=3", load_settings())
    assert isinstance(queue, RedisQueue) and queue.inbox_key == "abc:calls"
    await queue.close()  # never connected: nothing to say goodbye to
    with pytest.raises(ConfigError, match="timeout_s"):
        open_queue("redis://127.0.0.1:1/0?timeout_s=soon", load_settings())


# A value redis-py takes for each option a queue URL may carry.
URL_OPTION_SAMPLES = {
    "prefix": "abc", "timeout_s": "3", "db": "2", "username": "u", "password": "p",
    "client_name": "fnq-test", "protocol": "3",
    "socket_timeout": "2.5", "socket_connect_timeout": "1.5", "socket_keepalive": "yes",
    "socket_read_size": "65536", "retry_on_timeout": "yes", "health_check_interval": "30",
    "max_connections": "7", "ssl_ca_certs": "/ca.pem", "ssl_ca_path": "/ca",
    "ssl_ca_data": "x", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
    "ssl_password": "p", "ssl_cert_reqs": "none", "ssl_check_hostname": "no",
}  # fmt: skip


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
async def test_every_accepted_url_option_reaches_a_connection(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lean connections read the certificate files at once (tests/mq/test_resp.py
    # serves TLS with them); here the files are made up.
    monkeypatch.setattr(mq.resp, "_ssl_context", lambda kwargs: ssl.create_default_context())
    options = url_options(scheme)
    assert set(options) <= set(URL_OPTION_SAMPLES)
    for name in options:
        url = f"{scheme}://127.0.0.1:1/0?{name}={URL_OPTION_SAMPLES[name]}"
        queue = open_queue(url, load_settings())
        assert isinstance(queue, RedisQueue)
        pool = queue._client.connection_pool
        pool.make_connection()  # redis-py takes the option (no TypeError)
        if name not in {"prefix", "timeout_s", "max_connections"}:
            assert name in pool.connection_kwargs, name
        await queue.close()


async def test_redis_url_options_are_passed_with_their_types() -> None:
    url = "rediss://127.0.0.1:1/0?socket_timeout=2.5&health_check_interval=30&ssl_cert_reqs=none"
    queue = open_queue(url, load_settings())
    assert isinstance(queue, RedisQueue)
    kwargs = queue._client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.5
    assert kwargs["health_check_interval"] == 30
    assert kwargs["ssl_cert_reqs"] == "none"
    await queue.close()


def test_unknown_redis_url_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        open_queue("redis://127.0.0.1:1/0?prefx=myq&prefix=a", load_settings())
    message = str(err.value)
    assert message.startswith("queue URL: unknown option 'prefx' (accepted: prefix, timeout_s, ")
    assert "socket_timeout" in message and "ssl_ca_certs" not in message
    with pytest.raises(ConfigError, match=r"'timeout' \(accepted:"):
        open_queue("redis://127.0.0.1:1/0?timeout=3", load_settings())
    with pytest.raises(ConfigError, match="'ssl_ca_certs' is a TLS option: use rediss://"):
        open_queue("redis://127.0.0.1:1/0?ssl_ca_certs=/ca.pem", load_settings())
    with pytest.raises(ConfigError, match="Invalid value for 'socket_timeout'"):
        open_queue("redis://127.0.0.1:1/0?socket_timeout=soon", load_settings())
    with pytest.raises(ConfigError, match="prefix '' must be non-empty"):
        open_queue("redis://127.0.0.1:1/0?prefix=", load_settings())


@pytest.mark.parametrize("command", [["status"], ["worker"], ["call", "demo", "echo"]])
def test_cli_names_a_misspelt_url_option_in_one_line(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    assert CliRunner().invoke(cli, ["fn", "create", "demo", "echo", "--image", "x"]).exit_code == 0
    monkeypatch.setenv("FN_MQ_URL", "redis://127.0.0.1:1/0?prefx=myq")
    result = CliRunner().invoke(cli, command, input=b"")
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("fnq: queue URL: unknown option 'prefx' (accepted: prefix, ")


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


def test_burials_keep_valid_call_ids_only_and_the_newest_few() -> None:
    burials = Burials(limit=3)
    burials.add("inbox-1 2", "no valid id")
    for i in range(5):
        burials.add(f"c{i}", f"reason {i}")
    taken = burials.take()
    assert [(b.call_id, b.reason) for b in taken] == [(f"c{i}", f"reason {i}") for i in (2, 3, 4)]
    assert burials.take() == []
