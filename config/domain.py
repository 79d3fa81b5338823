"""The values every part of fnq talks about: functions, calls, statuses, outcomes.

This module is the one place that ``mq``, ``datastore`` and ``worker`` all
import. It holds plain immutable values and no I/O.

A call's life::

    queued --> running --> success | error | timeout
       \\          \\
        +----------+--> cancelled

``queued`` and ``running`` are live; the other four are final. A final state
is never overwritten (a duplicate delivery of a finished call is acked and
dropped).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

# --------------------------------------------------------------------------- ids

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> two digits
_SHIFTS = tuple(range(70, -1, -10))


class _IdClock:
    """The last id made here: its millisecond, random part and time digits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms = 0
        self.rand = 0
        self.prefix = ""


_id_clock = _IdClock()

# Every call id fnq accepts, from any producer: safe as a file name and in a URL path.
CALL_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def new_call_id() -> str:
    """A 26-character id that sorts by creation time (48-bit ms + 80-bit random).

    Ids made in the same millisecond by one process stay ordered: the random
    part is incremented instead of drawn again.
    """
    clock = _id_clock
    with clock.lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= clock.ms:
            rand = (clock.rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(secrets.token_bytes(10), "big")
            clock.ms, clock.prefix = now_ms, _base32(now_ms, 5)
        clock.rand = rand
        prefix = clock.prefix
    # 26 digits are 130 bits: two zero bits and the 48-bit time (10 digits), then the
    # 80 random bits (16 digits).
    return prefix + _base32(rand, 8)


def _base32(value: int, pairs: int) -> str:
    """The low ``10 * pairs`` bits of ``value`` as ``2 * pairs`` Crockford digits."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS[-pairs:]])


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def utcnow() -> datetime:
    """This host's wall clock, in UTC, read through ``time.time_ns`` (as every time of
    day fnq takes from the host is)."""
    return _EPOCH + (time.time_ns() // 1000) * _US


def frozen_map(values: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(values or {}))


# ----------------------------------------------------------------------- status


class CallStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


LIVE_STATUSES = frozenset({CallStatus.QUEUED, CallStatus.RUNNING})
FINAL_STATUSES = frozenset(
    {CallStatus.SUCCESS, CallStatus.ERROR, CallStatus.TIMEOUT, CallStatus.CANCELLED}
)


class FailureKind(StrEnum):
    """Why a call did not succeed, as far as retrying is concerned.

    ``BUSY``: never started because this worker had no room in time; hand the
    message back, no attempt is charged. ``TERMINAL``: never started and no
    retry can help (unknown function, missing image, too big for the machine,
    malformed message). ``FUNCTION``: the function ran and failed, crashed or
    timed out; the function's retry policy decides. ``CANCELLED``: stopped on
    request or expired before it could start.
    """

    BUSY = "busy"
    TERMINAL = "terminal"
    FUNCTION = "function"
    CANCELLED = "cancelled"


# -------------------------------------------------------------------- functions

# Bounds as Fn had them for functions (memory in MB, times in seconds).
MEMORY_MB_DEFAULT = 128
# The docker engine refuses a container with less ("Minimum memory limit allowed is 6MB"):
# a function under it could never start a container.
MEMORY_MB_MIN = 6
MEMORY_MB_MAX = 8 * 1024
TIMEOUT_S_DEFAULT = 30
TIMEOUT_S_MAX = 3600
IDLE_TIMEOUT_S_DEFAULT = 30
IDLE_TIMEOUT_S_MAX = 3600
MAX_ATTEMPTS_DEFAULT = 3
RETRY_BACKOFF_S_DEFAULT = 2.0
MAX_AGE_S_DEFAULT = 6 * 3600


@dataclass(frozen=True, slots=True)
class Function:
    """A registered function: which image to run and within what limits."""

    app: str
    name: str
    image: str
    memory_mb: int = MEMORY_MB_DEFAULT
    cpus_mcpu: int = 0  # 0 = no CPU quota
    timeout_s: int = TIMEOUT_S_DEFAULT
    idle_timeout_s: int = IDLE_TIMEOUT_S_DEFAULT
    tmpfs_mb: int = 0
    config: Mapping[str, str] = field(default_factory=frozen_map)
    max_attempts: int = MAX_ATTEMPTS_DEFAULT
    retry_backoff_s: float = RETRY_BACKOFF_S_DEFAULT
    max_age_s: int = MAX_AGE_S_DEFAULT
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def ref(self) -> str:
        return f"{self.app}/{self.name}"


# ------------------------------------------------------------------------ calls


@dataclass(frozen=True, slots=True)
class Call:
    """One asynchronous invocation as a producer asked for it.

    This is what travels on the queue. ``body`` is the request body handed to
    the function; ``headers`` are passed through to it (hop-by-hop headers are
    dropped at dispatch).
    """

    id: str
    app: str
    fn: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    created_at: datetime = field(default_factory=utcnow)
    priority: int = 0  # 0..2, higher first
    delay_s: float = 0.0

    @property
    def fn_ref(self) -> str:
        return f"{self.app}/{self.fn}"


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
# A call's header names and values together (UTF-8): every byte is stored with the
# call and sent to the function, as the body is (which FN_MAX_REQUEST_SIZE bounds).
MAX_HEADERS_BYTES = 64 * 1024


# What an HTTP field value may not hold (RFC 9110 5.5): control characters but the tab.
# A function's HTTP server answers 400 to them, which would look like the function's
# failure and be retried.
_HEADER_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Lone surrogates (from JSON "\udcff" escapes) cannot be encoded as UTF-8 at all.
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def header_problem(name: object, value: object) -> str | None:
    """Why ``name: value`` cannot go into an HTTP request, or None if it can."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        return f"header name {name!r} is not a valid HTTP header name"
    if not isinstance(value, str) or _HEADER_VALUE_CONTROL.search(value):
        return f"header {name!r} must have a one-line string value without control characters"
    if _SURROGATES.search(value):
        return f"header {name!r} has a value that is not UTF-8 text"
    return None


def headers_problem(headers: Mapping[str, object]) -> str | None:
    """Why ``headers`` cannot go with a call (one of them, or all of them together
    over :data:`MAX_HEADERS_BYTES`), or None if they can."""
    size = 0
    for name, value in headers.items():
        problem = header_problem(name, value)
        if problem is not None:
            return problem
        size += len(str(name)) + len(str(value).encode())
    if size > MAX_HEADERS_BYTES:
        return (
            f"headers of {size} bytes (names and values) exceed the limit of "
            f"{MAX_HEADERS_BYTES} bytes"
        )
    return None


@dataclass(frozen=True, slots=True)
class Response:
    """What the function answered: its HTTP status, headers and body."""

    status: int
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    body: bytes = b""
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What running a call came to. The agent returns one for every call."""

    status: CallStatus
    error: str | None = None
    failure: FailureKind | None = None
    response: Response | None = None
    log: bytes = b""
    log_truncated: bool = False
    container_id: str | None = None
    image: str | None = None  # the image of the container that ran it
    started_at: datetime | None = None
    completed_at: datetime | None = None
    stats: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def started(self) -> bool:
        return self.started_at is not None


def hostname_id() -> str:
    """A short identifier of this process, for records of which worker ran what."""
    return f"{os.uname().nodename}:{os.getpid()}"


@functools.cache
def pid_namespace() -> str:
    """This process's pid namespace (the inode of ``/proc/self/ns/pid``), "" if unknown.
    A pid names the same process only within one namespace: workers in containers that
    share a host name (``--network host``) each have their own."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_gone(ident: str, pidns: str) -> bool:
    """Whether ``ident`` (a ``hostname_id()``) names a process of this host, in pid
    namespace ``pidns`` (see :func:`pid_namespace`), that no longer runs. False when
    that cannot be told from here: another host's, another namespace's (or one not
    known), an identifier of another form."""
    host, _, pid = ident.rpartition(":")
    if host != os.uname().nodename or not pid.isdigit():
        return False
    if not pidns or pidns != pid_namespace():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # it exists, under another user; or no pid at all
    return False
