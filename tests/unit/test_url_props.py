"""Properties of the queue, datastore and log URLs a user writes: any text gives a
value or the module's own error, URLs built from parts read back as those parts,
and a password never shows once masked."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from asyncpg import connect_utils
from asyncpg.exceptions import ClientConfigurationError
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from config.errors import ConfigError
from config.settings import Settings, load_settings, mask_url, sqlite_url
from datastore.base import open_log_store
from datastore.errors import StoreError
from datastore.filelogs import FileLogStore
from datastore.postgres import url_problem
from datastore.sqlite import path_from_url
from mq.redis_url import open_client
from mq.sqlite import SqliteQueue

SCHEMES = ["redis", "rediss", "unix", "sqlite", "postgresql", "file", "http", ""]
URL_CHARS = st.characters(codec="utf-8") | st.sampled_from(":/?#[]@!$&'()*+,;=%. -_~09")

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
hosts = names | ipv4 | ipv6
ports = st.integers(1, 65535)
# Any text, reserved characters and non-ASCII included; written escaped, as a user must.
secrets_ = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)
prefixes = st.text(
    st.characters(codec="utf-8").filter(lambda c: not c.isspace() and c != "\x00"),
    min_size=1,
    max_size=12,
)
# File names as the system has them: any bytes but NUL and '/', UTF-8 or not.
segments = st.binary(min_size=1, max_size=12).filter(lambda b: b"\x00" not in b and b"/" not in b)
paths = st.lists(segments.map(os.fsdecode), min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))
utf8_paths = st.lists(
    st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=8),
    min_size=1,
    max_size=3,
).map(lambda s: "/" + "/".join(s))


@st.composite
def any_urls(draw: st.DrawFn) -> str:
    """Text that looks like a URL in part: a scheme, '://' and anything after."""
    scheme = draw(st.sampled_from(SCHEMES))
    return f"{scheme}://" + draw(st.text(URL_CHARS, max_size=40))


@st.composite
def redis_urls(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A valid queue URL and what it names."""
    scheme = draw(st.sampled_from(["redis", "rediss", "unix"]))
    user = draw(st.none() | secrets_)
    password = draw(st.none() | secrets_)
    userinfo = quote(user or "", safe="") + (f":{quote(password, safe='')}" if password else "")
    at = f"{userinfo}@" if userinfo else ""
    db = draw(st.integers(0, 10**6))
    prefix = draw(st.none() | prefixes)
    timeout_s = draw(st.none() | st.integers(1, 10**6).map(lambda n: n / 1000))
    query: dict[str, str] = {}
    if prefix is not None:
        query["prefix"] = prefix
    if timeout_s is not None:
        query["timeout_s"] = repr(timeout_s)
    expect: dict[str, object] = {"db": db, "username": user, "password": password}
    if scheme == "unix":
        path = draw(utf8_paths)
        query["db"] = str(db)
        url = f"unix://{at}{quote(path, safe='/')}"
        expect["path"] = path
    else:
        host, port = draw(hosts), draw(ports)
        url = f"{scheme}://{at}{host}:{port}/{db}"
        expect |= {"host": host.strip("[]"), "port": port}
    text = urlencode(query)
    return url + (f"?{text}" if text else ""), {
        **expect,
        "prefix": prefix or "fnq",
        "timeout_s": 7.0 if timeout_s is None else timeout_s,
    }


def mutations(url: str) -> st.SearchStrategy[str]:
    """``url`` with a character put in, taken out or replaced somewhere."""
    spots = st.integers(0, len(url))
    chars = st.sampled_from(":/?#[]@%=&+ \x00\t\u0661\udcff") | st.characters()
    put = st.tuples(spots, chars).map(lambda a: url[: a[0]] + a[1] + url[a[0] :])
    cut = st.tuples(spots, spots).map(lambda a: url[: min(a)] + url[max(a) :])
    swap = st.tuples(spots, chars).map(lambda a: url[: a[0]] + a[1] + url[a[0] + 1 :])
    return put | cut | swap


# ------------------------------------------------------------ queue URLs


@settings(max_examples=250)
@given(any_urls())
def test_any_queue_url_opens_or_is_a_config_error(url: str) -> None:
    try:
        client, prefix, timeout_s = open_client(url, 1.0)
    except ConfigError as exc:
        assert str(exc).startswith("queue URL: ")
        return
    assert prefix and not any(c.isspace() for c in prefix)
    assert 0 < timeout_s < float("inf")
    assert isinstance(client.connection_pool.connection_kwargs.get("db", 0), int)


@settings(max_examples=200)
@given(redis_urls().flatmap(lambda u: mutations(u[0])))
def test_a_mutated_queue_url_opens_or_is_a_config_error(url: str) -> None:
    try:
        open_client(url, 1.0)
    except ConfigError as exc:
        assert str(exc).startswith("queue URL: ")


@settings(max_examples=200)
@given(redis_urls())
def test_a_queue_url_built_from_parts_reads_back_as_them(
    sample: tuple[str, dict[str, object]],
) -> None:
    url, want = sample
    client, prefix, timeout_s = open_client(url, 7.0)
    kwargs = client.connection_pool.connection_kwargs
    assert (prefix, timeout_s) == (want["prefix"], want["timeout_s"])
    assert kwargs.get("db", 0) == want["db"]
    assert kwargs.get("username") == want["username"]
    assert kwargs.get("password") == want["password"]
    if "path" in want:
        assert kwargs["path"] == want["path"]
    else:
        assert kwargs["host"] == want["host"]
        assert kwargs["port"] == want["port"]


@settings(max_examples=300)
@given(
    st.sampled_from(["redis", "rediss", "postgresql"]),
    st.none() | secrets_,
    hosts,
    secrets_,
    st.sampled_from(["userinfo", "password", "ssl_password"]),
    st.none() | prefixes,
)
def test_a_masked_url_never_shows_its_password(
    scheme: str, user: str | None, host: str, password: str, where: str, prefix: str | None
) -> None:
    """Written escaped where the user writes it: in the userinfo, or as a query option."""
    userinfo = quote(user or "", safe="")
    head = f"{scheme}://{userinfo}"
    query = [("prefix", prefix)] if prefix else []
    if where == "userinfo":
        url = f"{head}:{quote(password, safe='')}@{host}/0"
        want = f"{head}:***@{host}/0"
    else:
        url, want = f"{head}@{host}/0", f"{head}@{host}/0"
        query.append((where, password))
    tail = urlencode(query)
    want_tail = urlencode(query[:-1]) if where != "userinfo" else tail
    if where != "userinfo":
        want_tail += ("&" if want_tail else "") + f"{where}=***"
    url += f"?{tail}" if tail else ""
    want += f"?{want_tail}" if want_tail else ""
    masked = mask_url(url)
    assert masked == want
    forms = {password, quote(password, safe=""), quote_plus(password)}
    assume(not any(form in want for form in forms))  # a short secret that is also the host
    assert not any(form in masked for form in forms)


@settings(max_examples=300)
@given(
    st.sampled_from(["redis", "rediss", "unix", "postgresql", ""]),
    st.none() | secrets_,
    hosts | st.just(""),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00*"), min_size=1, max_size=20)
    | st.text(":/?#@&=%+", min_size=1, max_size=8),
    st.sampled_from(["userinfo", "password", "sslpassword"]),
    st.none() | prefixes,
)
def test_a_password_written_raw_never_shows_once_masked(
    scheme: str, user: str | None, host: str, password: str, where: str, prefix: str | None
) -> None:
    """Pasted as it is: ':', '/', '?', '#', '@', '&' and all."""
    head = f"{scheme}://{quote(user or '', safe='')}"
    query = f"?{urlencode({'prefix': prefix})}" if prefix else ""
    if where == "userinfo":
        url = f"{head}:{password}@{host}/0{query}"
    else:
        url = f"{head}@{host}/0{query}{'&' if query else '?'}{where}={password}"
    assume(url.count(password) == 1)  # a short secret that is also the host, say
    assert password not in mask_url(url)


def quote_plus(text: str) -> str:
    return urlencode({"": text})[1:]


# ----------------------------------------------------------- SQLite URLs


@settings(max_examples=300)
@given(paths)
def test_a_sqlite_url_of_any_path_reads_back_as_that_path(path: str) -> None:
    url = sqlite_url(Path(path))
    assert url.isascii() and url.startswith("sqlite:///")
    assert path_from_url(url) == Path(path)
    assert SqliteQueue.from_url(url, SETTINGS, create=False).path == Path(path)


@settings(max_examples=250)
@given(st.one_of(any_urls(), paths.map(lambda p: sqlite_url(Path(p))).flatmap(mutations)))
def test_any_sqlite_url_is_an_absolute_path_or_refused(url: str) -> None:
    try:
        path = path_from_url(url)
    except StoreError as exc:
        assert str(exc).startswith(f"FN_DB_URL {url!r}: a SQLite URL ")
        with pytest.raises(ConfigError, match=r"^queue URL .*: a SQLite URL "):
            SqliteQueue.from_url(url, SETTINGS, create=False)
        return
    assert path.is_absolute() and "\x00" not in str(path) and str(path) != "/"
    assert SqliteQueue.from_url(url, SETTINGS, create=False).path == path


# --------------------------------------------------------- PostgreSQL URLs


@st.composite
def postgres_urls(draw: st.DrawFn) -> str:
    user = quote(draw(secrets_), safe="")
    password = draw(st.none() | secrets_.map(lambda s: quote(s, safe="")))
    hostlist = ",".join(
        draw(hosts) + draw(st.sampled_from(["", ":"]).flatmap(lambda c: ports.map(
            lambda p: f"{c}{p}" if c else "")))
        for _ in range(draw(st.integers(1, 3)))
    )  # fmt: skip
    db = quote(draw(secrets_), safe="")
    auth = f"{user}:{password}" if password else user
    return f"postgresql://{auth}@{hostlist}/{db}"


def asyncpg_reads(url: str) -> None:
    """asyncpg's own reading of a DSN (what connecting does first); no connection."""
    connect_utils._parse_connect_dsn_and_args(
        dsn=url, host=None, port=None, user=None, password=None, passfile=None,
        database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
        server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
    )  # fmt: skip


@settings(max_examples=150)
@given(postgres_urls())
def test_a_postgres_url_built_from_parts_has_no_problem(url: str) -> None:
    assert url_problem(url) is None
    asyncpg_reads(url)


@settings(max_examples=200)
@given(
    st.one_of(
        any_urls().map(lambda u: "postgresql" + u[u.index(":") :]),
        postgres_urls().flatmap(mutations),
    )
)
def test_a_postgres_url_without_a_problem_is_read_by_asyncpg(url: str) -> None:
    """What url_problem lets through, asyncpg reads or refuses with its own error."""
    assume(url_problem(url) is None)
    with contextlib.suppress(ClientConfigurationError):
        asyncpg_reads(url)


# ------------------------------------------------------------- log URLs


def file_url(path: str) -> str:
    return "file://" + quote(path, safe="/", errors="surrogateescape")


@settings(max_examples=200)
@given(st.one_of(any_urls(), paths.map(file_url).flatmap(mutations)))
def test_any_log_url_is_a_directory_or_one_error(url: str) -> None:
    try:
        store = asyncio.run(open_log_store(load_settings(log_url=url)))
    except ConfigError as exc:
        assert str(exc).startswith(f"invalid settings: FN_LOG_URL={mask_url(url)!r}: ")
        return
    except StoreError as exc:
        assert str(exc).startswith("FN_LOG_URL=")
        return
    assert isinstance(store, FileLogStore) and "\x00" not in str(store.directory)


@settings(max_examples=200)
@given(paths)
def test_a_log_url_of_any_path_reads_back_as_that_path(path: str) -> None:
    url = file_url(path)
    store = asyncio.run(open_log_store(load_settings(log_url=url)))
    assert isinstance(store, FileLogStore) and store.directory == Path(path)


# --------------------------------------------------------- URL settings


@settings(max_examples=200)
@given(st.sampled_from(["mq_url", "db_url", "log_url", "rq_url"]), any_urls() | st.text())
def test_a_url_setting_is_taken_as_given_or_named_in_its_error(field: str, text: str) -> None:
    try:
        value = getattr(load_settings(**{field: text}), field)
    except ConfigError as exc:
        assert str(exc).startswith(f"invalid settings: FN_{field.upper()}={text!r}: ")
        return
    assert value == text or (not text and field in ("mq_url", "db_url"))


SETTINGS = Settings(data_dir=Path("/nonexistent/fnq"))
