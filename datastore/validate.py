"""Checks on function definitions and on user input that names times.

The worker and the CLI both call these, so a function is judged by the same
rules whichever way it reaches the registry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from config.domain import (
    IDLE_TIMEOUT_S_MAX,
    MEMORY_MB_MAX,
    MEMORY_MB_MIN,
    TIMEOUT_S_MAX,
    Function,
    frozen_map,
    utcnow,
)
from datastore.errors import InvalidFunction

CPUS_MCPU_MAX = 256_000
# The engine's smallest CPU quota is 1 ms per 100 ms period: 10 milli-CPUs.
CPUS_MCPU_MIN = 10
MAX_ATTEMPTS_MAX = 100
RETRY_BACKOFF_S_MAX = 3600.0
MAX_AGE_S_MAX = 30 * 24 * 3600
CONFIG_ENTRIES_MAX = 256
CONFIG_VALUE_BYTES_MAX = 32_768

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

# Docker's reference grammar, spelled out: [host[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*)"
_IMAGE = re.compile(
    rf"(?:{_HOST}(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?",
    re.ASCII,  # \w of a tag: [A-Za-z0-9_]
)

# Fields a caller may change with update_fn; identity and timestamps are the store's.
MUTABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(Function)) - {
    "app",
    "name",
    "created_at",
    "updated_at",
}


def name_problem(kind: str, value: str) -> str | None:
    if _NAME.fullmatch(value):
        return None
    return (
        f"{kind} name {value!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-', "
        "starting with a letter or digit"
    )


def image_problem(image: str) -> str | None:
    if len(image) > 255 or not _IMAGE.fullmatch(image):
        return (
            f"image {image!r} is not a valid image reference "
            "(expected e.g. 'myfunc:1.0' or 'registry.example.com:5000/team/myfunc:latest')"
        )
    return None


def _range(label: str, value: float, low: float, high: float, unit: str) -> str | None:
    if low <= value <= high:
        return None
    # .15g: every digit of a whole number (a max age of 2592001 is not "2.592e+06")
    return f"{label} must be between {low:.15g} and {high:.15g} {unit}, not {value:.15g}"


def _cpus_problem(mcpu: int) -> str | None:
    if mcpu == 0 or CPUS_MCPU_MIN <= mcpu <= CPUS_MCPU_MAX:
        return None
    return (
        f"cpus must be 0 (no quota) or between {CPUS_MCPU_MIN} and {CPUS_MCPU_MAX} "
        f"milli-CPUs, not {mcpu:g}"
    )


def _is_utf8(text: str) -> bool:
    """False for a lone surrogate: bytes that were not UTF-8, which no store can hold."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _config_problems(config: Mapping[str, str]) -> Iterable[str]:
    if len(config) > CONFIG_ENTRIES_MAX:
        yield f"config may hold at most {CONFIG_ENTRIES_MAX} entries"
    for key, value in config.items():
        if not _ENV_KEY.fullmatch(key):
            yield f"config key {key!r} is not a valid environment variable name"
        size = len(value.encode(errors="surrogatepass"))
        if "\x00" in value or size > CONFIG_VALUE_BYTES_MAX or not _is_utf8(value):
            yield (
                f"config value of {key!r} must be UTF-8 text without NUL of at most "
                f"{CONFIG_VALUE_BYTES_MAX} bytes"
            )


def function_problems(fn: Function) -> list[str]:
    """Every reason ``fn`` cannot be stored; empty when it is fine."""
    checks = [
        name_problem("app", fn.app),
        name_problem("function", fn.name),
        image_problem(fn.image),
        _range("memory", fn.memory_mb, MEMORY_MB_MIN, MEMORY_MB_MAX, "MB"),
        _cpus_problem(fn.cpus_mcpu),
        _range("timeout", fn.timeout_s, 1, TIMEOUT_S_MAX, "seconds"),
        _range("idle timeout", fn.idle_timeout_s, 1, IDLE_TIMEOUT_S_MAX, "seconds"),
        _range("tmpfs", fn.tmpfs_mb, 0, fn.memory_mb, "MB (at most the memory)"),
        _range("max attempts", fn.max_attempts, 1, MAX_ATTEMPTS_MAX, "attempts"),
        _range("retry backoff", fn.retry_backoff_s, 0, RETRY_BACKOFF_S_MAX, "seconds"),
        _range("max age", fn.max_age_s, 1, MAX_AGE_S_MAX, "seconds"),
    ]
    problems = [p for p in checks if p is not None]
    problems.extend(_config_problems(fn.config))
    return problems


def validate_function(fn: Function) -> Function:
    """Return ``fn`` (config frozen) or raise InvalidFunction naming every problem."""
    problems = function_problems(fn)
    if problems:
        raise InvalidFunction(f"function {fn.app}/{fn.name}: " + "; ".join(problems))
    return dataclasses.replace(fn, config=frozen_map(fn.config))


def apply_changes(fn: Function, changes: Mapping[str, Any]) -> Function:
    """``fn`` with ``changes`` applied and validated; unknown fields are refused."""
    unknown = sorted(set(changes) - MUTABLE_FIELDS)
    if unknown:
        raise InvalidFunction(
            f"cannot change {', '.join(unknown)} of a function "
            f"(changeable: {', '.join(sorted(MUTABLE_FIELDS))})"
        )
    return validate_function(dataclasses.replace(fn, **changes))


# ------------------------------------------------------------------ user times

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", re.ASCII)  # ASCII digits, spaces
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


# Longer spans reach past year 1 when taken from now (an OverflowError), or past what a
# timedelta holds; a century covers any call record.
MAX_DURATION = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d``, ``1w`` (a bare number means seconds), at most
    ``MAX_DURATION``."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 30s, 10m, 2h or 1d)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text.strip()[:40]!r} is longer than {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def parse_since(text: str, now: datetime | None = None, *, local: bool = False) -> datetime:
    """A point in time: a duration back from now (``10m``) or an ISO 8601 time; one
    without a zone is UTC, or with ``local`` the local time (as the CLI shows times)."""
    if _DURATION.fullmatch(text):
        return (now or utcnow()) - parse_duration(text)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (10m, 2h, 1d) nor an ISO time (2024-05-01T12:00:00Z)"
        ) from None
    if when.tzinfo is None and not local:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)  # the range check: a datastore compares in UTC
    except (OverflowError, ValueError):  # ValueError: a local time out of range
        raise ValueError(f"{text.strip()!r} is out of range in UTC (years 1 to 9999)") from None


def parse_config(pairs: Iterable[str]) -> dict[str, str]:
    """``["K=V", ...]`` to a dict; ``K=`` sets an empty value."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidFunction(f"config entry {pair!r} must look like KEY=VALUE")
        out[key] = value
    return out
