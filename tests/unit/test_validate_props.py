"""Properties of function definitions and of the times a user names: any value gives a
Function (a duration, a time) or the validation error, and good values are kept as given."""

from __future__ import annotations

import base64
import dataclasses
import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.domain import (
    CALL_ID_RE,
    IDLE_TIMEOUT_S_MAX,
    MEMORY_MB_MAX,
    MEMORY_MB_MIN,
    TIMEOUT_S_MAX,
    Function,
)
from datastore.base import decode_cursor, encode_cursor
from datastore.errors import InvalidCursor, InvalidFunction
from datastore.validate import (
    CPUS_MCPU_MAX,
    MAX_DURATION,
    image_problem,
    name_problem,
    parse_config,
    parse_duration,
    parse_since,
    validate_function,
)

NAME_CHARS = string.ascii_letters + string.digits + "_.-"
good_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)
component = st.from_regex(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", fullmatch=True)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
registry = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,6}){0,2}", fullmatch=True)


@st.composite
def good_images(draw: st.DrawFn) -> str:
    path = "/".join(draw(st.lists(component, min_size=1, max_size=3)))
    host = draw(st.none() | registry)
    port = draw(st.none() | st.integers(1, 65535))
    if host:
        path = f"{host}{f':{port}' if port else ''}/{path}"
    if draw(st.booleans()):
        path += ":" + draw(tag)
    if draw(st.booleans()):
        path += "@sha256:" + draw(st.text("0123456789abcdef", min_size=64, max_size=64))
    return path


texts = st.text(max_size=30) | st.text(st.characters(codec="ascii"), max_size=30)
env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@st.composite
def functions(draw: st.DrawFn) -> Function:
    """Any values, sometimes good ones, in every field a user gives."""
    ints = st.integers(-(10**6), 10**7)
    return Function(
        app=draw(good_names | texts),
        name=draw(good_names | texts),
        image=draw(good_images() | texts),
        memory_mb=draw(st.integers(MEMORY_MB_MIN, MEMORY_MB_MAX) | ints),
        cpus_mcpu=draw(st.integers(0, CPUS_MCPU_MAX) | ints),
        timeout_s=draw(st.integers(1, TIMEOUT_S_MAX) | ints),
        idle_timeout_s=draw(st.integers(1, IDLE_TIMEOUT_S_MAX) | ints),
        tmpfs_mb=draw(st.integers(0, 64) | ints),
        config=draw(st.dictionaries(env_keys | texts, texts, max_size=4)),
        max_attempts=draw(st.integers(1, 100) | ints),
        retry_backoff_s=draw(st.floats(0, 3600) | st.floats()),
        max_age_s=draw(st.integers(1, 3600) | ints),
    )


@settings(max_examples=150)
@given(functions())
def test_any_function_is_stored_as_given_or_refused_by_name(fn: Function) -> None:
    try:
        stored = validate_function(fn)
    except InvalidFunction as exc:
        assert str(exc).startswith(f"function {fn.app}/{fn.name}: ")
        return
    assert dataclasses.replace(stored, config=dict(stored.config)) == fn
    assert name_problem("app", fn.app) is None and name_problem("function", fn.name) is None
    assert image_problem(fn.image) is None
    assert MEMORY_MB_MIN <= fn.memory_mb <= MEMORY_MB_MAX and 0 <= fn.tmpfs_mb <= fn.memory_mb
    assert 0 <= fn.retry_backoff_s <= 3600
    for key, value in fn.config.items():
        assert key.isascii() and key.isidentifier() and "\x00" not in value
        value.encode()  # UTF-8


@settings(max_examples=300)
@given(good_names | texts)
def test_a_name_is_ascii_letters_digits_and_three_signs(name: str) -> None:
    good = 1 <= len(name) <= 64 and all(c in NAME_CHARS for c in name) and name[0].isalnum()
    assert (name_problem("app", name) is None) == good


@settings(max_examples=80)
@given(good_images())
def test_a_well_formed_image_reference_is_taken(image: str) -> None:
    assert image_problem(image) is None or len(image) > 255


@settings(max_examples=120)
@given(texts | good_images().map(lambda i: i + "\u00e9") | st.text(string.printable, max_size=40))
def test_an_image_that_is_taken_is_ascii_without_spaces(image: str) -> None:
    if image_problem(image) is None:
        assert image.isascii() and image.isprintable() and " " not in image


@settings(max_examples=300)
@given(st.dictionaries(st.text(st.characters(exclude_characters="="), min_size=1), texts))
def test_config_pairs_read_back_as_the_map(config: dict[str, str]) -> None:
    assert parse_config([f"{k}={v}" for k, v in config.items()]) == config


@settings(max_examples=300)
@given(st.lists(texts, max_size=4))
def test_any_config_pairs_are_a_map_or_invalid(pairs: list[str]) -> None:
    try:
        parsed = parse_config(pairs)
    except InvalidFunction as exc:
        assert "must look like KEY=VALUE" in str(exc)
        return
    assert all("=" in p and not p.startswith("=") for p in pairs)
    assert set(parsed) == {p.partition("=")[0] for p in pairs}


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 1}


@settings(max_examples=300)
@given(st.integers(0, 10**7), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]))
def test_a_duration_is_taken_exactly(number: int, unit: str, space: str) -> None:
    text = f"{number}{space}{unit}"
    seconds = number * UNITS[unit]
    if seconds > MAX_DURATION.total_seconds():
        with pytest.raises(ValueError, match="is longer than"):
            parse_duration(text)
    else:
        assert parse_duration(text) == timedelta(seconds=seconds)


@settings(max_examples=400)
@given(texts | st.from_regex(r"\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*", fullmatch=True))
def test_any_duration_text_is_a_span_or_value_error(text: str) -> None:
    try:
        span = parse_duration(text)
    except ValueError as exc:
        assert "is not a duration" in str(exc) or "is longer than" in str(exc)
        return
    assert timedelta(0) <= span <= MAX_DURATION
    assert text.isascii()


@settings(max_examples=300)
@given(
    texts
    | st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
)
def test_any_since_is_an_aware_utc_time_or_value_error(text: str) -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    try:
        when = parse_since(text, now)
    except ValueError as exc:
        assert type(exc) is ValueError and str(exc)
        return
    assert when.tzinfo is UTC
    if "T" in text or "-" in text[1:]:
        parsed = datetime.fromisoformat(text.strip())
        assert when == (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


call_ids = st.from_regex(CALL_ID_RE, fullmatch=True)
times = st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC))


@settings(max_examples=300)
@given(times, call_ids)
def test_a_cursor_reads_back_as_its_time_and_call(when: datetime, call_id: str) -> None:
    assert decode_cursor(encode_cursor(when, call_id)) == (when, call_id)


@settings(max_examples=300)
@given(texts | st.binary(max_size=40).map(b64))
def test_any_cursor_text_is_a_position_or_invalid(text: str) -> None:
    try:
        when, call_id = decode_cursor(text)
    except InvalidCursor:
        return
    assert when.tzinfo is not None and CALL_ID_RE.fullmatch(call_id)
