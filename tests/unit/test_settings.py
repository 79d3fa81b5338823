"""Settings: Fn's names and defaults, validation errors that name the variable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from asyncpg.exceptions import InvalidPasswordError
from click.testing import CliRunner

from config.errors import ConfigError, FnqError
from config.settings import (
    Settings,
    env_name,
    load_settings,
    mask_url,
    public_view,
    unknown_env_names,
)
from datastore.base import open_log_store
from datastore.errors import StoreError
from datastore.postgres import _refused
from datastore.sqlite import path_from_url
from mq.base import open_queue
from mq.rq import RQQueue
from mq.sqlite import SqliteQueue
from worker.cli import cli
from worker.cli.config_cmd import markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_fn_defaults(settings_env: Path) -> None:
    s = load_settings()
    assert s.freeze_idle_msecs == 1_000  # fnq's measured choice (Fn: 50)
    assert s.hot_poll_msecs == 200
    assert s.hot_launcher_timeout_msecs == 3_600_000
    assert s.hot_pull_timeout_msecs == 600_000
    assert s.hot_start_timeout_msecs == 5_000
    assert s.async_chew_poll_msecs == 60_000
    assert s.max_log_size_bytes == 1_048_576
    assert s.max_pids == 50
    assert s.max_open_files == 350
    assert s.enable_nb_resource_tracker is False
    assert s.mq_url == f"sqlite://{settings_env / 'data' / 'mq.db'}"
    assert s.db_url == f"sqlite://{settings_env / 'data' / 'fnq.db'}"
    assert s.log_url == ""


@pytest.mark.parametrize(
    ("data_dir", "url_path"),
    [
        ("rel", "{cwd}/rel"),
        ("{cwd}/a#b?c%d", "{cwd}/a%23b%3Fc%25d"),
        ("{cwd}/tab\there and\nthere", "{cwd}/tab%09here%20and%0Athere"),
    ],
)
def test_the_default_urls_name_the_data_dir(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, data_dir: str, url_path: str
) -> None:
    """A relative FN_DATA_DIR is taken from the current directory; characters a URL
    gives meaning to are escaped in the URL."""
    monkeypatch.setenv("FN_DATA_DIR", data_dir.format(cwd=settings_env))
    s = load_settings()
    assert s.db_url == f"sqlite://{url_path.format(cwd=settings_env)}/fnq.db"
    assert s.mq_url == f"sqlite://{url_path.format(cwd=settings_env)}/mq.db"
    wanted = Path(data_dir.format(cwd=settings_env)).absolute() / "fnq.db"
    assert path_from_url(s.db_url) == wanted  # read back as the same path


def test_environment_overrides(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FN_HOT_POLL_MSECS", "75")
    monkeypatch.setenv("FN_ENABLE_NB_RESOURCE_TRACKER", "true")
    monkeypatch.setenv("FN_MQ_URL", "redis://127.0.0.1:6379/2")
    s = load_settings()
    assert s.hot_poll_msecs == 75
    assert s.secs("hot_poll_msecs") == pytest.approx(0.075)
    assert s.enable_nb_resource_tracker is True
    assert s.mq_url == "redis://127.0.0.1:6379/2"


def test_dotenv_file_is_read(settings_env: Path) -> None:
    (settings_env / ".env").write_text("FN_MAX_PIDS=77\n")
    assert load_settings().max_pids == 77


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FN_HOT_POLL_MSECS", "soon"),
        ("FN_METRICS_PORT", "70000"),
        ("FN_MQ_URL", "localhost:6379"),
        ("FN_ENABLE_NB_RESOURCE_TRACKER", "perhaps"),
        ("FN_LOG_LEVEL", "loud"),
        ("FN_LOG_FORMAT", "XML"),
    ],
)
def test_bad_value_names_variable_and_value(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in str(err.value)
    assert repr(value) in str(err.value)


INTEGER_ERROR = "Value error, must be an integer: ASCII digits with an optional sign"


@pytest.mark.parametrize(
    "value",
    [
        *("1_0", " 1_000 ", "10.0", "1.", "1e3", "0x10", "10 000", "+-1", "nan", "inf", "soon"),
        *("\u0661\u0660", "\uff11\uff10", "\xa010", "10\u3000", "\x1c10"),
    ],
)
def test_an_integer_is_ascii_digits_with_an_optional_sign(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """int() and pydantic read '1_0' as 10, '10.0' as 10 and other scripts' digits:
    a typo, most likely, is refused with the variable and the value as written."""
    monkeypatch.setenv("FN_MAX_PIDS", value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value) == f"invalid settings: FN_MAX_PIDS={value!r}: {INTEGER_ERROR}"


@pytest.mark.parametrize(
    ("value", "expected"), [(" 12 ", 12), ("\t12\r\n", 12), ("+12", 12), ("012", 12), ("0", 0)]
)
def test_an_integer_may_have_a_sign_and_blanks_around_it(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: int
) -> None:
    monkeypatch.setenv("FN_MAX_PIDS", value)
    monkeypatch.setenv("FN_FREEZE_IDLE_MSECS", " -1 ")
    settings = load_settings()
    assert (settings.max_pids, settings.freeze_idle_msecs) == (expected, -1)


def test_fnq_worker_with_a_bad_integer_says_so_in_one_line(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_: object) -> None:
        raise AssertionError("the worker started")

    monkeypatch.setattr("worker.cli.run.setup_logging", never)
    monkeypatch.setenv("FN_MQ_MAX_DELIVERIES", "1_0")
    result = CliRunner().invoke(cli, ["worker", "--burst"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"fnq: invalid settings: FN_MQ_MAX_DELIVERIES='1_0': {INTEGER_ERROR}\n"
    )


@pytest.mark.parametrize(
    ("value", "expected"), [("JSON", "json"), ("Text", "text"), ("json", "json")]
)
def test_log_format_and_level_take_any_case(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("FN_LOG_FORMAT", value)
    monkeypatch.setenv("FN_LOG_LEVEL", "debug")
    settings = load_settings()
    assert (settings.log_format, settings.log_level) == (expected, "DEBUG")


def test_an_empty_number_says_how_to_get_the_default(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_HOT_GROW_SPARE_MCPUS", "")
    with pytest.raises(ConfigError, match=r"SPARE_MCPUS='': .*to get the default, unset"):
        load_settings()


def test_negative_msecs_mean_disabled(settings_env: Path) -> None:
    s = load_settings(freeze_idle_msecs=-1, hot_launcher_timeout_msecs=-1)
    assert s.freeze_idle_s is None
    assert s.secs("hot_launcher_timeout_msecs") > 365 * 24 * 3600
    assert load_settings(freeze_idle_msecs=0).freeze_idle_s == 0.0


def test_msecs_stop_at_ten_years(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ten_years = 10 * 365 * 24 * 3600 * 1000
    assert load_settings(hot_poll_msecs=ten_years).secs("hot_poll_msecs") == ten_years / 1000
    monkeypatch.setenv("FN_HOT_POLL_MSECS", str(10**21))  # "never" is written -1
    with pytest.raises(ConfigError, match=r"FN_HOT_POLL_MSECS='1000000000000000000000': .*equal"):
        load_settings()


def test_secrets_are_masked(settings_env: Path) -> None:
    s = load_settings(
        sentry_dsn="https://key@sentry.example/1",
        db_url="postgresql://fnq:hunter2@db:5432/fnq",
    )
    view = public_view(s)
    assert view["FN_SENTRY_DSN"] == "***"
    assert "hunter2" not in view["FN_DB_URL"]
    assert view["FN_DB_URL"] == "postgresql://fnq:***@db:5432/fnq"
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("sqlite:///var/lib/fnq/mq.db") == "sqlite:///var/lib/fnq/mq.db"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # a password as it should be written, percent-encoded
        ("postgresql://fnq:hunter2@db:5432/fnq", "postgresql://fnq:***@db:5432/fnq"),
        ("redis://u:pa%2Fss%40%23%3F@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:pw@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://:@h/0", "redis://:***@h/0"),
        # raw '/', '#', '?', '@' and ':' in it: the userinfo ends at the last '@'
        ("redis://user:pa/ss@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:pa#ss@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:pa?ss@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:pa@ss@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:p/a?s#s@w:x@host/0?db=1", "redis://:***@host/0?db=1"),
        ("rediss://u:p/w@h/0?password=q/w", "rediss://u:***@h/0?password=***"),
        # no password
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("postgresql://u@h/db?application_name=a@b", "postgresql://u@h/db?application_name=a@b"),
        ("sqlite:///var/lib/fnq/mq.db", "sqlite:///var/lib/fnq/mq.db"),
        ("redis://[::1:6379/0", "redis://[::1:6379/0"),
        ("", ""),
        # a unix socket
        ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("redis+unix://u:p/w@/run/redis.sock", "redis+unix://u:***@/run/redis.sock"),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
        # a query option named like a password hides the rest of the URL
        ("redis://h/0?password=p&ss&db=1", "redis://h/0?password=***"),
        ("redis://h/0?password=pa#ss", "redis://h/0?password=***"),
        ("redis://h/0?db=1&PASSWORD=pw", "redis://h/0?db=1&PASSWORD=***"),
        ("redis://h/0?pass%77ord=pw", "redis://h/0?pass%77ord=***"),
        ("redis://h/0?ssl_password=pw", "redis://h/0?ssl_password=***"),
        (
            "rediss://u:p@h:6379/0?ssl_certfile=c&password=s3&sslpassword=k",
            "rediss://u:***@h:6379/0?ssl_certfile=c&password=***",
        ),
        ("postgresql://h/db?user=u&password=p@ss", "postgresql://h/db?user=u&password=***"),
        ("postgresql://h:5432/db?password=p@ss", "postgresql://h:***"),
        ("redis://user:x?password=y@host/0", "redis://user:***"),
        # not quite a URL
        ("user:pw@host", "user:***@host"),
        ("redis:/user:pw@host", "redis:***@host"),
        ("redis:user:p://w@host", "redis:***@host"),
    ],
)
def test_a_masked_url_shows_no_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_a_bad_url_setting_is_named_with_its_password_masked(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_MQ_URL", "redis://u:hunter2@[::1:6379/0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "hunter2" not in str(err.value)
    assert str(err.value).startswith("invalid settings: FN_MQ_URL='redis://u:***@[::1:6379/0': ")


SECRET = "hunter/2"  # a raw '/' ends the host for a URL parser


@pytest.mark.parametrize(
    "fail",
    [
        lambda: open_queue(f"amqp://u:{SECRET}@h/0", load_settings()),
        lambda: open_queue(f"sqlite://u:{SECRET}@h/q.db", load_settings()),
        lambda: RQQueue.from_url(f"http://u:{SECRET}@h/0", ["q"], load_settings()),
        lambda: path_from_url(f"sqlite://u:{SECRET}@h/fnq.db"),
        lambda: asyncio.run(open_log_store(load_settings(log_url=f"file://u:{SECRET}@h/logs"))),
        lambda: asyncio.run(open_log_store(load_settings(log_url=f"s3://u:{SECRET}@h/logs"))),
        lambda: _raise(_refused(f"postgresql://u:{SECRET}?@h/db", InvalidPasswordError("no"))),
    ],
    ids=["queue", "sqlite-queue", "rq", "sqlite-store", "log-host", "log-scheme", "postgres"],
)
def test_an_error_that_quotes_a_url_hides_its_password(
    settings_env: Path, fail: Callable[[], object]
) -> None:
    with pytest.raises(FnqError) as err:
        fail()
    assert "hunter" not in str(err.value) and ":***@" in str(err.value)


def _raise(exc: Exception) -> None:
    raise exc


def test_cli_config_json_and_error(settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["config", "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"FN_HOT_POLL_MSECS": 200' in ok.output
    monkeypatch.setenv("FN_MAX_PIDS", "many")
    bad = runner.invoke(cli, ["config"])
    assert bad.exit_code == 1
    assert "FN_MAX_PIDS='many'" in bad.output
    assert "Traceback" not in bad.output


def test_cli_config_json_keeps_numbers_and_booleans(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_MAX_PIDS", "88")
    monkeypatch.setenv("FN_ENABLE_NB_RESOURCE_TRACKER", "true")
    monkeypatch.setenv("FN_SENTRY_DSN", "https://key@sentry.example/1")
    monkeypatch.setenv("FN_DB_URL", "postgresql://fnq:hunter2@db:5432/fnq")
    view = json.loads(CliRunner().invoke(cli, ["config", "--json"]).output)
    assert (view["FN_MAX_PIDS"], view["FN_HOT_POLL_MSECS"]) == (88, 200)
    assert view["FN_ENABLE_NB_RESOURCE_TRACKER"] is True and view["FN_ASYNC_COUNT_IDLE"] is False
    assert view["FN_DATA_DIR"] == str(settings_env / "data") and view["FN_RQ_QUEUES"] == ""
    assert view["FN_SENTRY_DSN"] == "***"
    assert view["FN_DB_URL"] == "postgresql://fnq:***@db:5432/fnq"
    rows = [line.split() for line in CliRunner().invoke(cli, ["config"]).output.splitlines()]
    assert ["FN_ENABLE_NB_RESOURCE_TRACKER", "true"] in rows and ["FN_MAX_PIDS", "88"] in rows


def test_unknown_fn_variables_are_named_with_a_close_match() -> None:
    env = {"FN_MAX_PIDSS": "3", "FN_TYPO_SETTING": "1", "FN_DB_URL": "x", "PATH": "/bin"}
    assert unknown_env_names(env) == ["FN_MAX_PIDSS (did you mean FN_MAX_PIDS?)", "FN_TYPO_SETTING"]
    assert unknown_env_names({"FN_MAX_PIDS": "3"}) == []


def test_cli_config_warns_of_unknown_fn_variables(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FN_HOT_POL_MSECS", "5")
    out = CliRunner().invoke(cli, ["config", "--json"])
    assert out.exit_code == 0
    assert out.stderr == (
        "fnq: FN_HOT_POL_MSECS (did you mean FN_HOT_POLL_MSECS?) is not a setting of fnq: ignored\n"
    )
    assert json.loads(out.stdout)["FN_HOT_POLL_MSECS"] == 200


def test_unknown_fn_variables_in_dot_env_are_named_too(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (settings_env / ".env").write_text("FN_MAX_PID=5\nFN_MAX_PIDS=6\nOTHER=1\n")
    monkeypatch.setenv("FN_HOT_POL_MSECS", "5")
    assert unknown_env_names() == [
        "FN_HOT_POL_MSECS (did you mean FN_HOT_POLL_MSECS?)",
        "FN_MAX_PID (did you mean FN_MAX_PIDS?)",
    ]


def test_docs_table_is_current() -> None:
    text = DOCS.read_text()
    start = text.index("<!-- table:start -->\n") + len("<!-- table:start -->\n")
    end = text.index("<!-- table:end -->")
    assert text[start:end] == markdown_table(), "run `make docs` to refresh docs/configuration.md"


def _lower_bound(name: str) -> int | None:
    bounds = [m.ge for m in Settings.model_fields[name].metadata if hasattr(m, "ge")]
    return int(bounds[0]) if bounds else None


def test_docs_name_the_msecs_that_take_a_negative_value(settings_env: Path) -> None:
    text = DOCS.read_text()
    rule = text[text.index("- `*_MSECS` values") : text.index("- Sizes are bytes")]
    negatives, _, minimums = rule.partition("The others refuse one")
    msecs = {n for n in Settings.model_fields if n.endswith("_msecs")}
    unbounded = {n for n in msecs if _lower_bound(n) is None}
    assert {n for n in msecs if f"`{env_name(n)}`" in negatives} == unbounded
    for name in sorted(msecs):
        if name in unbounded:
            assert load_settings(**{name: -1}).secs(name) > 365 * 24 * 3600
        else:
            with pytest.raises(ConfigError, match=env_name(name)):
                load_settings(**{name: -1})
    above_zero = {n for n in msecs if (_lower_bound(n) or 0) > 0}
    assert {n for n in msecs if f"`{env_name(n)}`" in minimums} == above_zero


def test_every_field_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, f"FN_{name.upper()} has no description"


def test_the_rq_urls_password_is_masked(settings_env: Path) -> None:
    view = public_view(load_settings(rq_url="redis://:hunter2@rq-host:6379/1?password=s3"))
    assert view["FN_RQ_URL"] == "redis://:***@rq-host:6379/1?password=***"


@pytest.mark.parametrize("var", ["FN_MQ_URL", "FN_DB_URL", "FN_LOG_URL", "FN_RQ_URL"])
@pytest.mark.parametrize("value", ["redis://[::1:6379/0", "file://[host]/x"])
def test_a_url_that_does_not_split_names_its_variable(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert str(err.value).startswith(f"invalid settings: {var}={value!r}: Value error, ")
    assert "not a URL such as" in str(err.value)


def test_a_data_dir_that_is_not_utf8_is_taken_as_its_bytes(
    settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = str(settings_env / "caf\udce9")  # b"caf\xe9": Latin-1, as os.environ keeps it
    monkeypatch.setenv("FN_DATA_DIR", data_dir)
    s = load_settings()
    assert s.db_url == f"sqlite://{settings_env}/caf%E9/fnq.db"
    assert path_from_url(s.db_url) == Path(data_dir) / "fnq.db"
    assert SqliteQueue.from_url(s.mq_url, s).path == Path(data_dir) / "mq.db"


@pytest.mark.parametrize("url", ["sqlite:///tmp/a%00b.db", "sqlite:///%00"])
def test_a_sqlite_url_naming_a_nul_byte_is_refused(settings_env: Path, url: str) -> None:
    with pytest.raises(StoreError, match=r"a SQLite URL looks like sqlite:///absolute/path\.db"):
        path_from_url(url)
    with pytest.raises(ConfigError, match=r"a SQLite URL looks like sqlite:///absolute/path\.db"):
        SqliteQueue.from_url(url, load_settings())


def test_a_dot_env_that_is_not_utf8_is_one_line(settings_env: Path) -> None:
    (settings_env / ".env").write_bytes(b"FN_LOG_LEVEL=debug\nFN_IOFS_OPTS=caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^\.env: not UTF-8 text \(invalid .* at byte 35\)$"):
        load_settings()
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("fnq: .env: not UTF-8 text (")


@pytest.mark.parametrize("value", ["\u0131nfo", "warn\u0131ng", "cr\u0131t\u0131cal"])
def test_a_log_level_is_ascii(settings_env: Path, value: str) -> None:
    """A dotless i upper-cases to I: the name is checked as given, not as upper-cased."""
    with pytest.raises(ConfigError, match=rf"FN_LOG_LEVEL={value!r}: .*must be one of DEBUG,"):
        load_settings(log_level=value)
    assert load_settings(log_level="critical").log_level == "CRITICAL"


@pytest.mark.parametrize("url", ["sqlite://[/tmp/fnq.db", "sqlite://[x]/tmp/fnq.db"])
def test_a_sqlite_url_that_does_not_split_is_refused(settings_env: Path, url: str) -> None:
    with pytest.raises(StoreError, match=r"a SQLite URL looks like sqlite:///absolute/path\.db"):
        path_from_url(url)
    with pytest.raises(ConfigError, match=r"a SQLite URL looks like sqlite:///absolute/path\.db"):
        SqliteQueue.from_url(url, load_settings())
