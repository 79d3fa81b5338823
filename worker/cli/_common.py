"""What every subcommand shares: settings, --json output, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import unicodedata
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from config.errors import FnqError

if TYPE_CHECKING:
    from config.settings import Settings
    from datastore.wait import Waited

P = ParamSpec("P")
T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")

WAIT_S = 300.0  # how long ``--wait`` and ``calls wait`` wait by default
# How long a command's write waits for a datastore that cannot be written (down, its
# disk full) before the command fails with the reason (a worker waits as long as it takes).
WRITE_PATIENCE_S = 10.0
EXIT_FAILED = 1  # a call waited for ended other than `success`
EXIT_TIMED_OUT = 124  # some calls waited for had not ended when the wait ran out (as timeout(1))


class Seconds(click.FloatRange):
    """Seconds, 0 or more. ``nan``, which passes every range check, is refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def wait_timeout_option(flag: str, help_: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """The option bounding a wait for calls, as ``wait_timeout_s``."""
    return click.option(
        flag,
        "wait_timeout_s",
        type=Seconds(min=0),
        default=WAIT_S,
        show_default=True,
        help=help_,
    )


def wait_status(waited: Waited) -> int:
    """The exit status of ``fnq calls wait`` and ``fnq call --wait``."""
    if waited.pending:
        return EXIT_TIMED_OUT
    return 0 if waited.all_succeeded else EXIT_FAILED


def settings_from(ctx: click.Context) -> Settings:
    """The settings built once by the top-level group."""
    from config.settings import Settings, load_settings  # noqa: PLC0415 - not for --help

    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):
        obj = load_settings()
        ctx.find_root().obj = obj
    return obj


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on an event loop (asyncio is loaded here: ``fnq --help`` runs none)."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        import asyncio  # noqa: PLC0415

        return asyncio.run(coro)


def bad_value(flag: str, message: str) -> click.BadParameter:
    """A malformed value of option ``flag``: a usage error (exit status 2), its flag
    quoted as click quotes it (``Invalid value for '--since': ...``)."""
    return click.BadParameter(message, param_hint=f"'{flag}'")


def fail(message: str, code: int = 1) -> None:
    click.echo(f"fnq: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def quiet_when_stdout_closes() -> Iterator[None]:
    """End the command quietly when its reader has gone (``fnq status | head -1``).

    The exit status is the one a shell reports for a process ended by SIGPIPE
    (141). Standard output is pointed at /dev/null first, so that Python's
    flush of it at exit does not fail again.
    """
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(128 + signal.SIGPIPE)


def friendly_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Turn expected failures into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except FnqError as exc:
            fail(str(exc))
        except BrokenPipeError:
            raise  # not a failure: see quiet_when_stdout_closes
        except (OSError, ConnectionError) as exc:
            fail(f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


def short_time(value: datetime | None) -> str:
    """A time for a table: local, to the second."""
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def iso_time(value: datetime | None) -> str | None:
    """A time for JSON: ISO 8601 to the millisecond, as call records give theirs."""
    return None if value is None else value.isoformat(timespec="milliseconds")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# Control characters (C0, DEL, C1) as Python writes them in a string: a value with a
# line break or a tab in it (a function's config, a malformed message's fields)
# stays on its line of a table.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"  # as in JSON and FN_* settings
    return str(value).translate(_ESCAPES)


def _width(text: str) -> int:
    """Columns ``text`` takes on a terminal: wide East Asian characters take two,
    combining marks and format characters none."""
    if text.isascii():
        return len(text)
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned table for humans: one line per row."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(_width(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        padded = (c + " " * (w - _width(c)) for c, w in zip(row, widths, strict=True))
        click.echo("  ".join(padded).rstrip())
