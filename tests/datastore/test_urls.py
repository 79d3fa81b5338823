"""Datastore URLs that fnq cannot use: one error that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from config.errors import ConfigError
from config.settings import load_settings
from datastore import postgres
from datastore.base import open_datastore
from datastore.common import SqlDatastore
from datastore.errors import StoreError, StoreUnavailable
from tests.datastore.conftest import fresh_pg_database
from tests.rig import PostgresServer, impostor
from worker.cli import cli


@pytest.mark.parametrize("tail", ["?mode=ro", "#part"])
async def test_sqlite_url_takes_no_options(settings_env: Path, tail: str) -> None:
    url = f"sqlite:///{settings_env}/fnq.db{tail}"
    with pytest.raises(StoreError, match="a SQLite URL takes no options"):
        await open_datastore(load_settings(db_url=url))
    assert not (settings_env / "fnq.db").exists()


@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:////"])
async def test_a_sqlite_url_without_a_path_is_refused(settings_env: Path, url: str) -> None:
    with pytest.raises(StoreError, match=r"looks like sqlite:///absolute/path\.db"):
        await open_datastore(load_settings(db_url=url))


async def test_a_sqlite_datastore_whose_directory_cannot_be_made(settings_env: Path) -> None:
    (settings_env / "file").write_text("")  # a file where the directory would be
    with pytest.raises(StoreError, match="cannot open the datastore"):
        await open_datastore(load_settings(db_url=f"sqlite:///{settings_env}/file/fnq.db"))


async def test_sqlite_url_with_an_escaped_question_mark(settings_env: Path) -> None:
    store = await open_datastore(load_settings(db_url=f"sqlite:///{settings_env}/a%3Fb.db"))
    await store.close()
    assert (settings_env / "a?b.db").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("query", "error", "message"),
    [
        ("?sslmod=require", ConfigError, "FN_DB_URL: unknown option 'sslmod': PostgreSQL has no"
         " setting of that name, and asyncpg takes host, port, dbname, "),
        ("?connect_timeout=5", ConfigError, "FN_DB_URL: unknown option 'connect_timeout'"),
        ("?statement_timeout=soon", ConfigError, "FN_DB_URL: option statement_timeout='soon':"
         ' invalid value for parameter "statement_timeout"'),
        ("?sslmode=bogus", ConfigError, "FN_DB_URL: `sslmode` parameter must be one of"),
    ],
)  # fmt: skip
async def test_postgres_url_options_it_cannot_use(
    postgres_server: PostgresServer, settings_env: Path, query: str, error: type, message: str
) -> None:
    url = await fresh_pg_database(postgres_server)
    with pytest.raises(error) as err:
        await open_datastore(load_settings(db_url=url + query))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.integration
async def test_postgres_server_settings_and_login_errors(
    postgres_server: PostgresServer, settings_env: Path
) -> None:
    url = await fresh_pg_database(postgres_server)
    store = await open_datastore(
        load_settings(db_url=f"{url}?application_name=fnq-t&sslmode=disable")
    )
    assert isinstance(store, SqlDatastore)
    await store.close()
    nobody = url.replace(f"//{postgres_server.user}@", "//nobody:secret@") + "?password=secret"
    with pytest.raises(StoreError) as err:
        await open_datastore(load_settings(db_url=nobody))
    assert str(err.value) == (
        f"the PostgreSQL datastore {url.replace(f'//{postgres_server.user}@', '//nobody:***@')}"
        ' refused the connection: role "nobody" does not exist'
    )


async def test_a_postgres_server_that_never_answers_is_unreachable_in_words(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_S", 1.0)
    async with impostor(None) as port:
        url = f"postgresql://fnq@127.0.0.1:{port}/fnq?sslmode=disable"
        with pytest.raises(StoreUnavailable) as err:
            await open_datastore(load_settings(db_url=url))
    assert str(err.value) == f"cannot reach the PostgreSQL datastore {url}: no answer within 1 s"


@pytest.mark.integration
def test_cli_names_a_misspelt_postgres_option_in_one_line(
    postgres_server: PostgresServer, stores_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_DB_URL", f"{postgres_server.url}?sslmod=require")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("fnq: FN_DB_URL: unknown option 'sslmod': ")


@pytest.mark.parametrize(
    "url",
    ["file://tmp/logs", "file:///tmp/logs?sync=1", "file:///tmp/logs#x", "file://db-host/logs"],
)
async def test_a_log_url_is_a_local_directory_without_options(settings_env: Path, url: str) -> None:
    with pytest.raises(StoreError, match="a log directory URL is file:///ABSOLUTE/DIR"):
        await open_datastore(load_settings(log_url=url))


def test_a_log_path_without_a_scheme_is_told_the_log_url_form(settings_env: Path) -> None:
    with pytest.raises(ConfigError, match=r"FN_LOG_URL='/tmp/logs': .*file:///var/lib/fnq/logs"):
        load_settings(log_url="/tmp/logs")


async def test_a_log_directory_url_may_name_localhost_and_escape(settings_env: Path) -> None:
    url = f"file://localhost{settings_env}/my%20logs"
    store = await open_datastore(load_settings(log_url=url))
    await store.close()
    assert store._external_logs is not None  # a file log store under the unescaped path
    assert store._external_logs.path_of("order-1").is_relative_to(settings_env / "my logs")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://u@db:abc/fnq", "port 'abc' is not a number from 1 to 65535"),
        ("postgresql://u@db:99999/fnq", "port '99999' is not a number from 1 to 65535"),
        ("postgres://u@db1:5432,db2:x/fnq", "port 'x' is not a number from 1 to 65535"),
        ("postgresql://u@db/fnq?port=0", "port '0' is not a number from 1 to 65535"),
        ("postgresql://u@db1,/fnq", "the host list 'db1,' has an empty entry"),
        ("postgresql://u@[::1]5432/fnq", "host '[::1]5432' is not [IPv6 address]:PORT"),
        ("postgresql://u@db:@5432/fnq", "port '@5432' is not a number from 1 to 65535"),
        ("postgresql://u@db/fnq?sslmode", "the options 'sslmode' are not NAME=VALUE&..."),
        ("postgresql://u@db/fnq?a=1&", "the options 'a=1&' are not NAME=VALUE&..."),
    ],
)
async def test_a_postgres_url_asyncpg_cannot_read_is_a_config_error(
    settings_env: Path, url: str, problem: str
) -> None:
    """Refused before any connection: asyncpg raised ValueError, OverflowError or IndexError."""
    with pytest.raises(ConfigError) as err:
        await open_datastore(load_settings(db_url=url))
    assert str(err.value) == f"FN_DB_URL: {problem}"


def test_good_postgres_urls_have_no_problem() -> None:
    for url in ("postgresql://u:p%40ss@db:5432/fnq?sslmode=require", "postgres:///fnq?host=/run/pg",
                "postgresql://u@db1:5432,[::1]:6432,db3/fnq?port=5432,5433,5434"):  # fmt: skip
        assert postgres.url_problem(url) is None
