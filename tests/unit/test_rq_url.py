"""The RQ bridge's Redis URL: fnq's own queue options out, the connection's kept."""

from __future__ import annotations

import pytest

from config.errors import ConfigError
from mq.redis_url import open_client
from mq.rq import without_fnq_options


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
