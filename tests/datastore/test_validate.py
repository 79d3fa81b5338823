"""Validation and the small pure helpers of the datastore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from config.domain import Function
from datastore.base import bound_body, bound_log, decode_cursor, encode_cursor, truncation_marker
from datastore.errors import InvalidCursor, InvalidFunction
from datastore.validate import (
    function_problems,
    image_problem,
    parse_config,
    parse_duration,
    parse_since,
    validate_function,
)


@pytest.mark.parametrize(
    "image",
    ["hello", "hello:1.0", "team/hello:latest", "registry.example.com:5000/team/hello:v2",
     "localhost/a_b/c-d:x", "hello@sha256:" + "a" * 64],
)  # fmt: skip
def test_good_images(image: str) -> None:
    assert image_problem(image) is None


@pytest.mark.parametrize("image", ["", "Hello", "hello:", "a b", "hello:tag:two", "-x", "x/"])
def test_bad_images(image: str) -> None:
    problem = image_problem(image)
    assert problem is not None and "not a valid image reference" in problem


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"max_age_s": 2_592_001}, "max age must be between 1 and 2592000 seconds, not 2592001"),
     ({"retry_backoff_s": 3600.5}, "retry backoff must be between 0 and 3600 seconds, not 3600.5")],
)  # fmt: skip
def test_a_range_problem_gives_the_numbers_in_full(change: dict[str, float], problem: str) -> None:
    fn = Function("app", "f", "img", **change)  # type: ignore[arg-type]
    assert function_problems(fn) == [problem]


def test_every_problem_is_named_at_once() -> None:
    fn = Function("my app", "f", "img", memory_mb=0, timeout_s=4000, idle_timeout_s=0,
                  config={"1BAD": "x"})  # fmt: skip
    problems = function_problems(fn)
    assert len(problems) == 5
    with pytest.raises(InvalidFunction) as info:
        validate_function(fn)
    text = str(info.value)
    for part in ("app name 'my app'", "memory must be between 6 and 8192 MB, not 0",
                 "timeout must be between 1 and 3600 seconds, not 4000",
                 "idle timeout must be between 1 and 3600", "config key '1BAD'"):  # fmt: skip
        assert part in text


def test_limits_are_inclusive() -> None:
    fn = Function("a", "f", "img", memory_mb=8192, timeout_s=3600, idle_timeout_s=3600)
    assert function_problems(fn) == []
    assert function_problems(Function("a", "f", "img", memory_mb=6, timeout_s=1)) == []
    # The docker engine refuses a container under 6 MB: such a function could never run.
    assert function_problems(Function("a", "f", "img", memory_mb=5)) == [
        "memory must be between 6 and 8192 MB, not 5"
    ]


def test_durations_and_times() -> None:
    assert parse_duration("10m") == timedelta(minutes=10)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1d") == timedelta(days=1)
    assert parse_duration("45") == timedelta(seconds=45)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2024, 5, 1, 11, 30, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00:00").tzinfo is UTC
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday")
    # past year 1, or past what a timedelta holds: once an OverflowError (a traceback)
    assert parse_duration("36500d") == timedelta(days=36500)
    for text in ("36501d", "999999d", "99999999999d"):
        with pytest.raises(ValueError, match="is longer than 36500d"):
            parse_duration(text)
        with pytest.raises(ValueError, match="is longer than 36500d"):
            parse_since(text, now)
    # an offset that takes the time past year 1 or 9999 in UTC (PostgreSQL refused it)
    assert parse_since("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    for text in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"):
        with pytest.raises(ValueError, match="out of range in UTC"):
            parse_since(text)


def test_config_pairs() -> None:
    assert parse_config(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(InvalidFunction, match="KEY=VALUE"):
        parse_config(["nope"])


def test_log_bound_keeps_one_marker() -> None:
    assert bound_log(b"short", 100) == b"short"
    cut = bound_log(b"x" * 1000, 100)
    assert cut == b"x" * 100 + truncation_marker(100)
    assert bound_log(cut, 100) == cut  # already within limit plus a marker
    assert bound_log(b"abc", 0) == b"abc"  # a few bytes fit in the marker allowance
    assert bound_log(b"x" * 500, 0) == truncation_marker(0)


def test_body_bound() -> None:
    assert bound_body(b"abcdef", 4) == (b"abcd", True)
    assert bound_body(b"abcdef", 0) == (b"abcdef", False)  # 0 = no limit


def test_cursor_round_trip() -> None:
    at = datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC)
    for call_id in ("01HX0000000000000000000000", "order-1234", "a.b:c_d"):
        assert decode_cursor(encode_cursor(at, call_id)) == (at, call_id)
    # not base64; "foo-bar" (no time); "12~-x" (not an id); an old cursor, the id alone
    for bad in ("***", "", "Zm9vLWJhcg", "MTJ-LXg", "MDFIWDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA"):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


@pytest.mark.parametrize("text", ["\u0667d", "1\u0660m", "\uff13h", "5\u2003s"])
def test_durations_are_ascii(text: str) -> None:
    """Other scripts' digits and spaces: int() and float() take them, fnq does not."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text)
    assert parse_duration(" 7d ") == timedelta(days=7)


@pytest.mark.parametrize(
    "image", ["hello:caf\u00e9", "hello:\u0661", "hello:v\u00b2", "team/a:\u00e9t\u00e9"]
)
def test_an_image_tag_is_ascii(image: str) -> None:
    """Docker refuses such tags ("invalid reference format") only when pulling."""
    assert image_problem(image) is not None
    assert image_problem("hello:Caf_e-1.0") is None


def test_a_config_value_that_is_not_utf8_is_a_problem() -> None:
    fn = Function(app="a", name="b", image="img", config={"K": "caf\udce9"})
    with pytest.raises(InvalidFunction, match=r"config value of 'K' must be UTF-8 text without"):
        validate_function(fn)


def test_a_config_value_may_take_the_whole_limit_and_not_a_byte_more() -> None:
    """The message names the limit as the check applies it: at most, not under."""
    fn = Function(app="a", name="b", image="img", config={"K": "x" * 32768})
    assert validate_function(fn).config["K"] == "x" * 32768
    over = Function(app="a", name="b", image="img", config={"K": "x" * 32769})
    with pytest.raises(InvalidFunction, match=r"'K' must be .* of at most 32768 bytes$"):
        validate_function(over)
