"""Properties of settings read from the environment: each kind of value is taken as
written or refused with one error naming the variable and the value."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, get_args
from unittest import mock

import pytest
from annotated_types import Ge, Le
from hypothesis import given, settings
from hypothesis import strategies as st

from config.errors import ConfigError
from config.settings import Settings, env_name, load_settings, public_view

ROOT = Path(__file__).resolve().parents[2]
FIELDS = Settings.model_fields
INTS = sorted(n for n, f in FIELDS.items() if f.annotation is int)
BOOLS = sorted(n for n, f in FIELDS.items() if f.annotation is bool)
CHOICES = {"log_format": ("text", "json"), "cpu_split": ("auto", "on", "off")}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# What an environment variable may hold: any text but NUL, bytes that are not UTF-8 too.
env_text = st.text(st.characters(exclude_characters="\x00"), max_size=20) | st.binary(
    max_size=12
).filter(lambda b: b"\x00" not in b).map(os.fsdecode)


def bounds(name: str) -> tuple[int | None, int | None]:
    low = high = None
    for meta in FIELDS[name].metadata:
        if isinstance(meta, Ge):
            low = int(meta.ge)  # type: ignore[call-overload]
        if isinstance(meta, Le):
            high = int(meta.le)  # type: ignore[call-overload]
    return low, high


@contextmanager
def environment(values: dict[str, str], data_dir: str = "/nonexistent/fnq") -> Iterator[None]:
    """Only these FN_ variables (and FN_DATA_DIR), in a directory without a .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    env["FN_DATA_DIR"] = data_dir
    env.update(values)
    with mock.patch.dict(os.environ, env, clear=True):
        yield


@pytest.fixture(autouse=True)
def _no_dot_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def refused(exc: ConfigError, name: str, text: str) -> bool:
    return str(exc).startswith(f"invalid settings: {env_name(name)}={text!r}: ")


@settings(max_examples=300)
@given(st.sampled_from(INTS), st.integers(-(10**12), 10**12))
def test_an_integer_in_range_is_taken_exactly(name: str, number: int) -> None:
    low, high = bounds(name)
    with environment({env_name(name): str(number)}):
        if (low is None or number >= low) and (high is None or number <= high):
            assert getattr(load_settings(), name) == number
        else:
            with pytest.raises(ConfigError) as err:
                load_settings()
            assert refused(err.value, name, str(number)), err.value


@settings(max_examples=300)
@given(st.sampled_from(INTS), env_text)
def test_any_text_for_an_integer_is_a_number_or_named_error(name: str, text: str) -> None:
    with environment({env_name(name): text}):
        try:
            value = getattr(load_settings(), name)
        except ConfigError as exc:
            assert refused(exc, name, text), exc
            return
    assert type(value) is int
    low, high = bounds(name)
    assert (low is None or value >= low) and (high is None or value <= high)
    # ASCII digits with an optional sign, blanks around them
    assert re.fullmatch(r"[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*", text) and int(text) == value


@settings(max_examples=200)
@given(st.sampled_from(BOOLS), env_text)
def test_any_text_for_a_boolean_is_true_false_or_named_error(name: str, text: str) -> None:
    with environment({env_name(name): text}):
        try:
            value = getattr(load_settings(), name)
        except ConfigError as exc:
            assert refused(exc, name, text), exc
            return
    assert type(value) is bool
    words = {
        True: {"1", "on", "t", "true", "y", "yes"},
        False: {"0", "off", "f", "false", "n", "no"},
    }
    assert text.strip().lower() in words[value]


@settings(max_examples=200)
@given(
    st.sampled_from([*CHOICES, "log_level"]),
    env_text | st.sampled_from([*LEVELS, "Info", "json", "JSON", "auto", "On"]),
)
def test_any_text_for_a_choice_is_one_of_them_or_named_error(name: str, text: str) -> None:
    with environment({env_name(name): text}):
        try:
            value = getattr(load_settings(), name)
        except ConfigError as exc:
            assert refused(exc, name, text), exc
            return
    if name == "log_level":
        assert value == text.upper()
    elif name == "log_format":
        assert value == text.lower()
    else:
        assert value == text
    assert text.isascii() and value in CHOICES.get(name, LEVELS)


@settings(max_examples=200)
@given(
    st.lists(st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,15}", fullmatch=True), max_size=4),
    st.lists(st.sampled_from([" ", "\t", "\n", "  "]), min_size=5, max_size=5),
)
def test_networks_are_the_words_given(networks: list[str], gaps: list[str]) -> None:
    text = gaps[0] + "".join(n + g for n, g in zip(networks, gaps[1:], strict=False))
    with environment({"FN_DOCKER_NETWORKS": text}):
        assert load_settings().networks == networks


@settings(max_examples=100)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)).map(env_name), env_text, max_size=6))
def test_any_environment_gives_settings_or_one_config_error(values: dict[str, str]) -> None:
    with environment(values):
        try:
            view = public_view(load_settings())
        except ConfigError as exc:
            assert str(exc).startswith("invalid settings: FN_")
            assert "\n" not in str(exc).replace("\\n", "")
            return
    assert set(view) == {env_name(n) for n in FIELDS}


@settings(max_examples=60)
@given(env_text.filter(lambda t: t.strip() != ""))
def test_any_data_dir_gives_urls_that_read_back_as_it(text: str) -> None:
    with environment({}, data_dir=text):
        s = load_settings()
    from datastore.sqlite import path_from_url  # noqa: PLC0415 - the reader of db_url

    assert s.db_url.isascii()
    assert path_from_url(s.db_url) == Path(text).absolute() / "fnq.db"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FN_MQ_URL": "redis://[::1:6379/0"}, "FN_MQ_URL='redis://[::1:6379/0': "),
        ({"FN_MAX_PIDS": "\u0661\u0660"}, "FN_MAX_PIDS='\u0661\u0660': "),
        ({"FN_MAX_LOG_SIZE_BYTES": "1_0"}, "FN_MAX_LOG_SIZE_BYTES='1_0': "),
        ({"FN_LOG_LEVEL": "\u0131nfo"}, "FN_LOG_LEVEL='\u0131nfo': "),
        ({"FN_CPU_SPLIT": "AUTO"}, "FN_CPU_SPLIT='AUTO': "),
    ],
)
def test_fnq_config_says_what_is_wrong_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """The real command, in its own process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    run = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "config"],
        env={**base, "PYTHONPATH": str(ROOT), "FN_DATA_DIR": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith(f"fnq: invalid settings: {message}"), line


def test_fnq_config_takes_a_data_dir_that_is_not_utf8(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FN_")}
    data_dir = os.fsencode(tmp_path) + b"/caf\xe9"
    run = subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "config", "--json"],
        env={**base, "PYTHONPATH": str(ROOT)} | {"FN_DATA_DIR": os.fsdecode(data_dir)},
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert b'"FN_DB_URL": "sqlite://' + os.fsencode(tmp_path) + b'/caf%E9/fnq.db"' in run.stdout


def test_the_strategies_cover_every_kind_of_setting() -> None:
    kinds = set(INTS) | set(BOOLS) | set(CHOICES) | {"log_level"}
    others = {n for n in FIELDS if n not in kinds}
    assert all(FIELDS[n].annotation in (str, Path, Settings.model_fields["sentry_dsn"].annotation)
               for n in others)  # fmt: skip
    assert get_args(FIELDS["cpu_split"].annotation) == CHOICES["cpu_split"]
    assert FIELDS["log_format"].annotation == Literal["text", "json"]
