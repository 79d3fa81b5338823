"""Properties of the CLI's value parsers: any text gives the value or a usage error
(click.BadParameter or UsageError), never another exception; good values are taken
as written. A handful of the real commands show the exit status 2 and one line."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from config.domain import CALL_ID_RE
from datastore.base import encode_cursor
from datastore.validate import parse_since
from mq.wire import WireError
from worker.cli import cli
from worker.cli.fns import _config
from worker.cli.queue import build_call, parse_headers
from worker.cli.store import _cursor, _since

TOKEN = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
texts = st.text(max_size=30) | st.text(st.characters(codec="ascii"), max_size=30)
header_names = st.text(TOKEN, min_size=1, max_size=16)
header_values = st.text(
    st.characters(codec="ascii", min_codepoint=0x20, max_codepoint=0x7E), max_size=30
)


def usage_error(exc: click.ClickException, flag: str) -> None:
    assert isinstance(exc, click.BadParameter) and exc.param_hint == f"'{flag}'"
    assert exc.format_message().startswith(f"Invalid value for '{flag}': ")


@settings(max_examples=300)
@given(st.dictionaries(header_names, header_values, max_size=5), st.sampled_from(["", " ", "\t"]))
def test_headers_given_as_name_colon_value_are_taken(headers: dict[str, str], pad: str) -> None:
    items = [f"{pad}{name}{pad}:{pad}{value}" for name, value in headers.items()]
    parsed = parse_headers(items)
    assert parsed == {n: v.strip() for n, v in headers.items()}
    call = build_call("app", "fn", headers=parsed)
    assert dict(call.headers) == parsed


@settings(max_examples=300)
@given(st.lists(texts, max_size=4))
def test_any_header_text_is_a_header_or_a_usage_error(items: list[str]) -> None:
    try:
        headers = parse_headers(items)
    except click.BadParameter as exc:
        usage_error(exc, "--header")
        return
    try:
        build_call("app", "fn", headers=headers)
    except WireError as exc:  # fnq call turns it into a UsageError
        assert str(exc).startswith("header")


@settings(max_examples=300)
@given(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True) | texts,
    st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True) | texts,
    st.none() | st.from_regex(CALL_ID_RE, fullmatch=True) | texts,
    st.floats(0, 3600) | st.floats(),
    st.integers(0, 2) | st.integers(),
)
def test_any_call_is_built_as_given_or_refused(
    app: str, fn: str, call_id: str | None, delay_s: float, priority: int
) -> None:
    try:
        call = build_call(app, fn, call_id=call_id, delay_s=delay_s, priority=priority)
    except WireError as exc:
        assert str(exc)
        return
    assert (call.app, call.fn, call.delay_s, call.priority) == (app, fn, delay_s, priority)
    assert call.id == call_id if call_id else CALL_ID_RE.fullmatch(call.id)
    assert 0 <= delay_s < math.inf and 0 <= priority <= 2


@settings(max_examples=300)
@given(texts | st.from_regex(r"\d{1,4}(ms|s|m|h|d|w)", fullmatch=True))
def test_any_since_is_a_time_or_a_usage_error(text: str) -> None:
    try:
        when = _since(text)
    except click.BadParameter as exc:
        usage_error(exc, "--since")
        return
    assert when is not None and when.tzinfo is not None


@settings(max_examples=300)
@given(st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.just(UTC)))
def test_the_since_of_a_next_page_reads_back_as_the_same_time(when: datetime) -> None:
    """``more: fnq calls list --since ISO --cursor ...`` names the time the first page used."""
    assert parse_since(when.isoformat()) == when


@settings(max_examples=300)
@given(
    texts
    | st.builds(
        encode_cursor,
        st.datetimes(timezones=st.just(UTC)),
        st.from_regex(CALL_ID_RE, fullmatch=True),
    )
)
def test_any_cursor_is_taken_or_a_usage_error(text: str) -> None:
    try:
        assert _cursor(text) == text
    except click.BadParameter as exc:
        usage_error(exc, "--cursor")


@settings(max_examples=300)
@given(st.lists(texts, max_size=4))
def test_any_config_option_is_a_map_or_a_usage_error(pairs: list[str]) -> None:
    ctx = click.Context(click.Command("fn"))
    param = click.Option(["--config"], multiple=True)
    try:
        config = _config(ctx, param, tuple(pairs))
    except click.BadParameter as exc:
        assert "must look like KEY=VALUE" in exc.format_message()
        return
    assert config == {p.partition("=")[0]: p.partition("=")[2] for p in pairs}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "a", "f", "--header", "no colon"], "Invalid value for '--header': "),
        (["call", "a", "f", "--delay", "nan"], "delay nan is not between 0 and "),
        (["call", "a", "f", "--id", "x y"], "id 'x y' is not 1-128 characters"),
        (["calls", "list", "--since", "\u0667d"], "Invalid value for '--since': "),
        (["calls", "list", "--cursor", "!!"], "Invalid value for '--cursor': "),
        (["calls", "purge", "--older-than", "1y"], "Invalid value for '--older-than': "),
        (["fn", "create", "a", "f", "--image", "hello:caf\u00e9"], "function a/f: image "),
        (
            ["fn", "create", "a", "f", "--image", "i", "--config", "K"],
            "Invalid value for '--config'",
        ),
    ],
)
def test_a_bad_value_is_exit_status_2_and_one_line(
    settings_env: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"fnq: {message}"), line
    assert not (settings_env / "data").exists()  # refused before any store was opened
