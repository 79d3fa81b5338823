"""The RQ bridge's Redis URL: fnq's own queue options out, the connection's kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import load_settings
from mq.redis_url import open_client
from mq.rq import RQQueue, without_fnq_options


def test_fnq_options_go_and_connection_options_stay() -> None:
    url = "rediss://u:p@h:6380/2?prefix=jobs&ssl_ca_certs=%2Fetc%2Fca.pem&timeout_s=3&socket_timeout=5"
    assert without_fnq_options(url) == (
        "rediss://u:p@h:6380/2?ssl_ca_certs=%2Fetc%2Fca.pem&socket_timeout=5"
    )
    assert without_fnq_options("redis://h:6379/0?prefix=x") == "redis://h:6379/0"
    assert without_fnq_options("redis://h:6379/0") == "redis://h:6379/0"


def test_a_queue_url_that_does_not_split_is_a_config_error() -> None:
    for url in ("redis://[::1:6379/0", "rediss://[redis-host]:6379/0"):
        with pytest.raises(ConfigError, match=r"^queue URL: "):
            open_client(url, 1.0)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "1_0", "\u0661", " 2", "1e3"])
def test_a_queue_urls_timeout_is_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^queue URL: timeout_s=.* must be a positive number"):
        open_client(f"redis://h:6379/0?timeout_s={value}", 1.0)


@pytest.mark.parametrize(
    "url", ["redis://h:6379/O", "redis://h/1/2", "redis://h/%201", "redis://h/\u0661", "redis://h?db=\u0661",
            "unix:///run/redis.sock?db=1_0", "rediss://h/0?db=%2B1"],
)  # fmt: skip
def test_a_queue_urls_database_is_ascii_digits(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^queue URL: the database .* must be a number"):
        open_client(url, 1.0)


def test_a_queue_urls_numbers_are_taken_as_given() -> None:
    client, prefix, timeout_s = open_client("redis://h:6379/12?timeout_s=2.5&prefix=p", 1.0)
    assert (client.connection_pool.connection_kwargs["db"], prefix, timeout_s) == (12, "p", 2.5)
    client, _, timeout_s = open_client("unix:///run/r.sock?db=3&timeout_s=.5", 1.0)
    assert (client.connection_pool.connection_kwargs["db"], timeout_s) == (3, 0.5)
    assert open_client("redis://h", 4.0)[2] == 4.0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://h:6379/O", r"the database 'O' must be a number"),  # redis-py: database 0
        ("redis://h/\u0661", r"the database .* must be a number"),
        ("redis://[::1:6379/0", r"Invalid IPv6 URL"),
        ("redis://h:6379/0?socket_timeout=soon", r"Invalid value for 'socket_timeout'"),
    ],
)
def test_an_rq_url_redis_py_would_misread_is_a_config_error(
    url: str, reason: str, settings_env: Path
) -> None:
    settings = load_settings()
    with pytest.raises(ConfigError, match=rf"^RQ URL: {reason}"):
        RQQueue.from_url(url, ["default"], settings)
    assert (
        RQQueue.from_url(
            "redis://h:6379/3", ["default"], settings
        )._sync.connection_pool.connection_kwargs["db"]
        == 3
    )
