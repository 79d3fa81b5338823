"""The query options a Redis queue URL may carry (``redis://H:P/DB?prefix=...``)."""

from __future__ import annotations

# Query options of a queue URL: fnq's own, then redis-py's (those of
# redis.asyncio.connection.URL_QUERY_ARGUMENT_PARSERS and the text options its
# connections take) that make sense here. Left out: "timeout" (a blocking
# pool's), those that change the replies fnq reads (decode_responses,
# legacy_responses, encoding), deprecated ones (lib_name, lib_version), and TLS
# options the lean connections (mq.resp) would not apply: ssl_min_version,
# ssl_ciphers, ssl_*_verify_flags.
FNQ_URL_OPTIONS = ("prefix", "timeout_s")
REDIS_URL_OPTIONS = (
    "db", "username", "password", "client_name", "protocol",
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "socket_read_size",
    "retry_on_timeout", "health_check_interval", "max_connections",
)  # fmt: skip
TLS_URL_OPTIONS = (
    "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile", "ssl_keyfile",
    "ssl_password", "ssl_cert_reqs", "ssl_check_hostname",
)  # fmt: skip


def url_options(scheme: str) -> tuple[str, ...]:
    """The query options a ``redis://`` or ``rediss://`` queue URL may carry."""
    tls = TLS_URL_OPTIONS if scheme == "rediss" else ()
    return (*FNQ_URL_OPTIONS, *REDIS_URL_OPTIONS, *tls)
