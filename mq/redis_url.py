"""Redis queue URLs (``redis://H:P/DB?prefix=...``, ``rediss://`` for TLS,
``unix:///SOCKET?db=DB&prefix=...`` for a server on this host): the query
options they may carry, and the redis-py client one opens."""

from __future__ import annotations

import math
import re
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aioredis

from config.errors import ConfigError
from mq import wire

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

_DB = re.compile(r"[0-9]+")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def with_query(parts: SplitResult, query: list[tuple[str, str]] | dict[str, str]) -> str:
    """``parts`` with ``query`` as its query string; the ``//`` stays when the URL
    names no host (``unix:///SOCKET``), which ``urlunsplit`` would drop."""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    text = urlencode(query)
    return f"{parts.scheme}://{parts.netloc}{parts.path}{'?' if text else ''}{text}{fragment}"


def url_options(scheme: str) -> tuple[str, ...]:
    """The query options a ``redis://``, ``rediss://`` or ``unix://`` queue URL may carry."""
    tls = TLS_URL_OPTIONS if scheme == "rediss" else ()
    return (*FNQ_URL_OPTIONS, *REDIS_URL_OPTIONS, *tls)


def check_database(parts: SplitResult, label: str = "queue URL") -> None:
    """ConfigError unless the database number (path or ``?db=``) is ASCII digits:
    redis-py reads it with int(), which takes ' 1', '1_0' and other scripts' digits,
    and ignores a path it cannot read (database 0 instead)."""
    db_path = unquote(parts.path) if parts.scheme.lower() != "unix" else ""
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    for db in (db_path.removeprefix("/") or None, query.get("db")):
        if db is not None and not _DB.fullmatch(db):
            raise ConfigError(f"{label}: the database {db!r} must be a number, as in /0")


def open_client(url: str, default_timeout_s: float) -> tuple[aioredis.Redis, str, float]:
    """A redis-py client for queue URL ``url``, and fnq's own options: the key prefix
    and the time limit of each operation (``default_timeout_s`` when not given)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # a host in brackets that is no IPv6 address
        raise ConfigError(f"queue URL: {exc}") from None
    if parts.scheme.lower() == "unix" and (parts.hostname or not parts.path.strip("/")):
        raise ConfigError(
            "queue URL: unix:// takes the socket's absolute path and no host: unix:///PATH?db=DB"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    accepted = url_options(parts.scheme.lower())
    unknown = sorted(set(query) - set(accepted))
    if unknown and set(unknown) <= set(TLS_URL_OPTIONS):
        raise ConfigError(f"queue URL: {unknown[0]!r} is a TLS option: use rediss://")
    if unknown:
        raise ConfigError(
            f"queue URL: unknown option {', '.join(map(repr, unknown))}"
            f" (accepted: {', '.join(accepted)})"
        )
    prefix = query.pop("prefix", wire.DEFAULT_PREFIX)
    timeout_s = default_timeout_s
    if "timeout_s" in query:
        text = query.pop("timeout_s")
        timeout_s = float(text) if _SECONDS.fullmatch(text) else math.nan
        if not 0 < timeout_s < math.inf:
            raise ConfigError(f"queue URL: timeout_s={text!r} must be a positive number of seconds")
    check_database(parts)
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(f"queue URL: prefix {prefix!r} must be non-empty, without spaces")
    clean = with_query(parts, query)
    try:
        client = aioredis.Redis.from_url(clean, socket_connect_timeout=5.0, socket_timeout=None)
    except ValueError as exc:  # redis-py: a value it cannot read
        raise ConfigError(f"queue URL: {exc}") from None
    return client, prefix, timeout_s
