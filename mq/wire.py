"""The wire format of a queued call, shared by both backends and the producer API.

A message is a flat set of named fields (a Redis stream entry; in SQLite a JSON
object with the same names)::

    app       required  application name
    fn        required  function name
    body      optional  request body, raw bytes (JSON: text, or body_b64)
    id        optional  caller-chosen call id; a new one is made when absent
    headers   optional  JSON object of header name -> string value
    priority  optional  0, 1 or 2 (higher runs first); default 0
    delay     optional  seconds (decimal) before the call becomes visible
    created   optional  creation time, integer milliseconds since the epoch

Fields starting with ``_`` are the queue's own bookkeeping (``_n``: deliveries
that happened before this entry was written). Any other field name makes the
message malformed, so that a misspelt ``dealy`` is reported rather than ignored; so
does a name given twice in one stream entry (:func:`check_unique_names`).

This module imports only the standard library and ``config.domain`` so that
producers can use it with nothing but ``redis`` installed.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from config.domain import CALL_ID_RE, Call, frozen_map, headers_problem, utcnow

DEFAULT_PREFIX = "fnq"
INBOX = "calls"  # the stream producers XADD to: "<prefix>:calls"
MAX_PRIORITY = 2
MAX_DELAY_S = 366 * 24 * 3600.0
MAX_NAME_CHARS = 255
# The last millisecond a datetime can hold (9999-12-31T23:59:59.999Z): a larger
# ``created`` cannot become one, and would fail the consumer rather than the message.
MAX_CREATED_MS = 253_402_300_799_999

F_APP = "app"
F_FN = "fn"
F_BODY = "body"
F_BODY_B64 = "body_b64"  # JSON form only
F_ID = "id"
F_HEADERS = "headers"
F_PRIORITY = "priority"
F_DELAY = "delay"
F_CREATED = "created"
F_PRIOR = "_n"

_KNOWN = frozenset({F_APP, F_FN, F_BODY, F_ID, F_HEADERS, F_PRIORITY, F_DELAY, F_CREATED})
# The JSON form has no priority or delay: a row's priority is its column, and a payload
# naming either would have it ignored.
_JSON_KNOWN = frozenset({F_ID, F_APP, F_FN, F_BODY, F_BODY_B64, F_HEADERS, F_CREATED})
# No lone surrogates either (JSON "\udcff"): such a name cannot be stored as text.
_NAME_RE = re.compile(rf"[^\s/\x00-\x1f\x7f\ud800-\udfff]{{1,{MAX_NAME_CHARS}}}")


class WireError(ValueError):
    """A message that breaks the wire format; the text says how."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid message: the call plus routing facts not kept on the Call."""

    call: Call
    priority: int
    delay_s: float
    prior_deliveries: int


# ---------------------------------------------------------------- validation


def check_id(value: str) -> str:
    if not CALL_ID_RE.fullmatch(value):
        raise WireError(
            f"id {value[:80]!r} is not 1-128 characters of letters, digits, '_', '.', ':', '-',"
            " beginning with a letter or a digit"
        )
    return value


def check_name(kind: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise WireError(
            f"{kind} {value[:80]!r} must be 1-{MAX_NAME_CHARS} characters without "
            "spaces, '/' or control characters"
        )
    return value


def check_priority(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise WireError(f"priority {value!r} is not 0, 1 or 2")
    return value


def check_delay(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"delay {value!r} is not a number of seconds")
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY_S:
        raise WireError(f"delay {value!r} is not between 0 and {MAX_DELAY_S:.0f} seconds")
    return float(value)


def check_created(ms: object) -> datetime:
    """The creation time of ``created`` (integer ms since the epoch), or WireError."""
    if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_CREATED_MS:
        raise WireError(
            f"created {str(ms)[:40]!r} is not milliseconds since the epoch (0 to {MAX_CREATED_MS})"
        )
    return from_ms(ms)


def check_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    problem = headers_problem(headers)
    if problem is not None:
        raise WireError(problem)
    return headers


def check_body(body: bytes, max_body_bytes: int) -> bytes:
    if len(body) > max_body_bytes:
        raise WireError(
            f"body of {len(body)} bytes exceeds the limit of {max_body_bytes} bytes "
            "(FN_MAX_REQUEST_SIZE)"
        )
    return body


def check_call(call: Call, priority: int, delay_s: float, max_body_bytes: int) -> None:
    """Raise WireError unless a consumer would accept this call as it is."""
    check_id(call.id)
    check_name("app", call.app)
    check_name("fn", call.fn)
    check_priority(priority)
    check_delay(delay_s)
    check_headers(call.headers)
    check_body(call.body, max_body_bytes)
    check_created(ms_of(call.created_at))


# ------------------------------------------------------------ stream fields


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def ms_of(when: datetime) -> int:
    """Whole milliseconds since the epoch (a naive ``when`` is local time). Exact:
    through a float, a time could come back a millisecond early."""
    return (when.astimezone(UTC) - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def call_fields(
    call: Call,
    priority: int,
    *,
    delay_s: float = 0.0,
    prior_deliveries: int = 0,
    created: bool = True,
) -> dict[str, bytes]:
    """The stream fields of a call (its own id, app, fn, body, headers, created).
    Without ``created``, the time Redis adds the entry stands for it (the entry's id)."""
    out: dict[str, bytes] = {
        F_ID: call.id.encode(),
        F_APP: call.app.encode(),
        F_FN: call.fn.encode(),
        F_BODY: call.body,
        F_PRIORITY: str(priority).encode(),
    }
    if created:
        out[F_CREATED] = str(ms_of(call.created_at)).encode()
    if call.headers:
        out[F_HEADERS] = json.dumps(dict(call.headers), separators=(",", ":")).encode()
    if delay_s > 0:
        out[F_DELAY] = repr(float(delay_s)).encode()
    if prior_deliveries > 0:
        out[F_PRIOR] = str(prior_deliveries).encode()
    return out


def check_unique_names(names: Sequence[bytes]) -> None:
    """WireError if a field name comes more than once: a stream entry may repeat one
    (``XADD ... id a id b``), and which of its values was meant cannot be told."""
    seen: set[bytes] = set()
    for name in names:
        if name in seen:
            raise WireError(f"field {name.decode('utf-8', 'replace')!r} is given more than once")
        seen.add(name)


def _text(fields: Mapping[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"field {name!r} is not UTF-8 text") from None


# ASCII only: int() and float() also take '1_000', other scripts' digits and spaces.
_BLANK = " \t\r\n"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INTEGER_DIGITS_MAX = 40  # past every range here; int() refuses over 4300 digits
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _int(fields: Mapping[str, bytes], name: str, default: int) -> int:
    text = _text(fields, name)
    if text is None:
        return default
    digits = text.strip(_BLANK)
    if not _INTEGER.fullmatch(digits):
        raise WireError(f"{name} {text[:40]!r} is not an integer")
    if len(digits) > _INTEGER_DIGITS_MAX:
        raise WireError(f"{name} {text[:40]!r}... is out of range")
    return int(digits)


def _delay(fields: Mapping[str, bytes]) -> float:
    text = _text(fields, F_DELAY)
    number = "" if text is None else text.strip(_BLANK)
    if not number:
        return 0.0
    if not _DECIMAL.fullmatch(number):
        raise WireError(f"delay {number[:40]!r} is not a number of seconds")
    return check_delay(float(number))


class _RepeatedKey(ValueError):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object, unless it gives a key twice: which value was meant cannot be told."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return doc


# One decoder for every message: json.loads with a hook would make one per call.
_JSON = json.JSONDecoder(object_pairs_hook=_object)


def _loads(text: str | bytes, not_json: str) -> object:
    """``json.loads``, or WireError: besides JSONDecodeError and UnicodeDecodeError, it
    raises ValueError for a number of over 4300 digits and RecursionError for arrays
    or objects nested too deep. An object that gives a key twice is refused."""
    try:
        if isinstance(text, bytes):  # as json.loads takes bytes
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        return _JSON.decode(text)
    except _RepeatedKey as exc:
        raise WireError(f"JSON key {str(exc)[:80]!r} is given more than once") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"{not_json} ({exc.msg} at {exc.pos})") from None
    except (ValueError, RecursionError) as exc:
        raise WireError(f"{not_json} ({str(exc)[:100]})") from None


def parse_headers_json(text: str) -> Mapping[str, str]:
    data = _loads(text, "headers are not JSON")
    if not isinstance(data, dict):
        raise WireError("headers must be a JSON object of name -> string")
    return frozen_map(check_headers(data))


def decode_fields(
    raw: Mapping[bytes, bytes] | Mapping[str, bytes],
    max_body_bytes: int,
    *,
    default_id: str | None = None,
    default_created_ms: int | None = None,
) -> Parsed:
    """Validate stream fields and build the call, or raise WireError with the reason."""
    fields = {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in raw.items()
    }
    unknown = sorted(k for k in fields if k not in _KNOWN and not k.startswith("_"))
    if unknown:
        raise WireError(f"unknown field(s) {', '.join(repr(u) for u in unknown[:5])}")
    app = _text(fields, F_APP)
    fn = _text(fields, F_FN)
    if not app or not fn:
        missing = [n for n, v in ((F_APP, app), (F_FN, fn)) if not v]
        raise WireError(f"missing required field(s): {', '.join(missing)}")
    call_id = _text(fields, F_ID) or default_id
    if not call_id:
        raise WireError("missing required field: id")
    headers_text = _text(fields, F_HEADERS)
    headers = parse_headers_json(headers_text) if headers_text else frozen_map()
    priority = check_priority(_int(fields, F_PRIORITY, 0))
    if default_created_ms is None:
        default_created_ms = ms_of(utcnow())
    created_at = check_created(_int(fields, F_CREATED, default_created_ms))
    prior = _int(fields, F_PRIOR, 0)
    if prior < 0:
        raise WireError(f"{F_PRIOR} must not be negative")
    call = Call(
        id=check_id(call_id),
        app=check_name("app", app),
        fn=check_name("fn", fn),
        body=check_body(fields.get(F_BODY, b""), max_body_bytes),
        headers=headers,
        created_at=created_at,
        priority=priority,
        delay_s=0.0,
    )
    return Parsed(call, priority, _delay(fields), prior)


# --------------------------------------------------------------- JSON form


def call_json(call: Call) -> bytes:
    """The JSON form of a call (SQLite payload column)."""
    doc: dict[str, object] = {
        F_ID: call.id,
        F_APP: call.app,
        F_FN: call.fn,
        F_CREATED: ms_of(call.created_at),
    }
    try:
        doc[F_BODY] = call.body.decode("utf-8")
    except UnicodeDecodeError:
        doc[F_BODY_B64] = base64.b64encode(call.body).decode("ascii")
    if call.headers:
        doc[F_HEADERS] = dict(call.headers)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_json(
    payload: object, priority: int, max_body_bytes: int, *, default_created_ms: int = 0
) -> Call:
    """Validate a JSON payload and build the call, or raise WireError with the reason.

    ``payload`` is whatever the column held: SQLite keeps a number written there by
    another program as a number. ``default_created_ms``: the creation time of a
    payload without ``created``.
    """
    if not isinstance(payload, bytes | str):
        raise WireError(f"payload must be JSON text, not {type(payload).__name__} {payload!r:.40}")
    doc = _loads(payload, "payload is not JSON")
    if not isinstance(doc, dict):
        raise WireError("payload must be a JSON object")
    unknown = sorted(k for k in doc if k not in _JSON_KNOWN)
    if unknown:
        raise WireError(
            f"unknown field(s) {', '.join(repr(u) for u in unknown[:5])} (a payload has id, "
            "app, fn, body or body_b64, headers and created; the priority is the row's)"
        )
    for name in (F_ID, F_APP, F_FN):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise WireError(f"field {name!r} is missing or not a string")
    body = _json_body(doc)
    headers = doc.get(F_HEADERS)
    if headers is None:
        headers = {}
    elif not isinstance(headers, dict):
        raise WireError("headers must be a JSON object of name -> string")
    created_at = check_created(doc.get(F_CREATED, default_created_ms))
    return Call(
        id=check_id(doc[F_ID]),
        app=check_name("app", doc[F_APP]),
        fn=check_name("fn", doc[F_FN]),
        body=check_body(body, max_body_bytes),
        headers=frozen_map(check_headers(headers)),
        created_at=created_at,
        priority=check_priority(priority),
        delay_s=0.0,
    )


def _json_body(doc: dict[str, object]) -> bytes:
    text = doc.get(F_BODY)
    b64 = doc.get(F_BODY_B64)
    if text is not None and b64 is not None:
        raise WireError("payload has both body and body_b64")
    if b64 is not None:
        if not isinstance(b64, str):
            raise WireError("body_b64 is not a string")
        try:
            return base64.b64decode(b64, validate=True)
        except ValueError:
            raise WireError("body_b64 is not base64") from None
    if text is None:
        return b""
    if not isinstance(text, str):
        raise WireError("body is not a string (use body_b64 for bytes)")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, "\udcff"
        raise WireError("body is not UTF-8 text (use body_b64 for bytes)") from None
