"""The wire format on its own: what is accepted, what is malformed and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from config.domain import MAX_HEADERS_BYTES, Call
from mq import wire


def fields(**kw: bytes) -> dict[bytes, bytes]:
    base = {b"app": b"demo", b"fn": b"echo"}
    base.update({k.encode(): v for k, v in kw.items()})
    return base


def test_minimal_fields_get_an_id_and_creation_time() -> None:
    parsed = wire.decode_fields(fields(), 100, default_id="ID1", default_created_ms=1_000)
    assert parsed.call.id == "ID1"
    assert parsed.call.created_at == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert (parsed.priority, parsed.delay_s, parsed.prior_deliveries) == (0, 0.0, 0)
    assert parsed.call.body == b""


def test_every_field() -> None:
    parsed = wire.decode_fields(
        fields(
            id=b"x-1",
            body=b"\x00\x01",
            priority=b"2",
            delay=b"1.5",
            created=b"5",
            headers=b'{"A":"b"}',
            _n=b"3",
        ),
        100,
    )
    call = parsed.call
    assert (call.id, call.body, dict(call.headers), call.priority) == (
        "x-1",
        b"\x00\x01",
        {"A": "b"},
        2,
    )
    assert (parsed.delay_s, parsed.prior_deliveries) == (1.5, 3)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"priority": b"3"}, "priority 3"),
        ({"priority": b"x"}, "not an integer"),
        ({"delay": b"-1"}, "delay"),
        ({"delay": b"nan"}, "delay"),
        ({"headers": b"[1]"}, "JSON object"),
        ({"headers": b'{"A": 1}'}, "string value"),
        ({"headers": b'{"A b": "1"}'}, "header name"),
        ({"headers": b'{"A": "a\\u0001b"}'}, "without control characters"),
        ({"headers": b'{"A": "a\\u007fb"}'}, "without control characters"),
        ({"headers": b'{"A": "\\udcff"}'}, "not UTF-8"),
        ({"body": b"x" * 11}, "exceeds"),
        ({"id": b"has space"}, "id"),
        ({"app": b"a/b"}, "app"),
        ({"fn": b""}, "missing required"),
        ({"created": b"-5"}, "created"),
        ({"created": b"99999999999999999999999"}, "created"),  # OverflowError once
        ({"created": b"253402300800000"}, "created"),  # year 10000: ValueError once
        ({"colour": b"red"}, "unknown field"),
        ({"app": b"\xff"}, "UTF-8"),
        ({"headers": b"9" * 4301}, "headers are not JSON"),  # ValueError from json once
        ({"headers": b'{"A":' + b"1" * 4301 + b"}"}, "headers are not JSON"),
        ({"headers": b"[" * 5000}, "headers are not JSON"),  # RecursionError once
        # ASCII numbers only: int() and float() would take these
        ({"priority": b"1_0"}, "not an integer"),
        ({"priority": "\u0661".encode()}, "not an integer"),  # an Arabic-Indic 1
        ({"priority": "1\u3000".encode()}, "not an integer"),  # an ideographic space
        ({"created": b"1_000"}, "not an integer"),
        ({"created": b"9" * 5000}, "out of range"),  # ValueError from int() once
        ({"delay": b"1_0"}, "not a number"),
        ({"delay": "\u0661".encode()}, "not a number"),
        ({"delay": b"inf"}, "not a number"),
    ],
)
def test_malformed_fields_say_why(extra: dict[str, bytes], reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_fields(fields(**{"id": b"i", **extra}), 10)


def test_headers_are_bounded_together() -> None:
    # Names and values in UTF-8 bytes: 4 + 65,532 bytes is the most; a two-byte
    # character more is over it.
    at_limit = {"X-Ab": "v" * (MAX_HEADERS_BYTES - 4)}
    assert dict(wire.check_headers(at_limit)) == at_limit
    over = {"X-Ab": "v" * (MAX_HEADERS_BYTES - 5) + "\u00e9"}
    with pytest.raises(
        wire.WireError, match=f"headers of 65537 bytes .* limit of {MAX_HEADERS_BYTES}"
    ):
        wire.check_headers(over)
    many = json.dumps({f"H{i}": "x" * 100 for i in range(700)}).encode()
    with pytest.raises(wire.WireError, match="exceed the limit"):
        wire.decode_fields(fields(id=b"i", headers=many), 10)


def test_a_field_name_given_twice_is_malformed() -> None:
    wire.check_unique_names([b"app", b"fn", b"id"])
    with pytest.raises(wire.WireError, match="field 'id' is given more than once"):
        wire.check_unique_names([b"app", b"id", b"fn", b"id"])
    with pytest.raises(wire.WireError, match="field 'b\ufffd' is given more than once"):
        wire.check_unique_names([b"b\xff", b"b\xff"])


def test_numbers_may_have_blanks_and_signs_around_them() -> None:
    extra = {"priority": b" +2\t", "delay": b" .5e1 ", "created": b"\n1000", "_n": b"3 "}
    parsed = wire.decode_fields(fields(id=b"i", **extra), 10)
    assert (parsed.priority, parsed.delay_s, parsed.prior_deliveries) == (2, 5.0, 3)
    assert parsed.call.created_at == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_headers_that_give_a_name_twice_are_malformed() -> None:
    with pytest.raises(wire.WireError, match="JSON key 'X-A' is given more than once"):
        wire.decode_fields(fields(id=b"i", headers=b'{"X-A": "1", "X-A": "2"}'), 10)
    # Names that differ in case are two headers, as in HTTP.
    parsed = wire.decode_fields(fields(id=b"i", headers=b'{"X-A": "1", "x-a": "2"}'), 10)
    assert dict(parsed.call.headers) == {"X-A": "1", "x-a": "2"}


def test_json_payloads_in_any_utf_may_start_with_a_bom() -> None:
    doc = '{"id":"i","app":"a","fn":"f","body":"\u00e9"}'
    for payload in (doc.encode("utf-8-sig"), doc.encode("utf-16"), doc.encode("utf-32-le")):
        assert wire.decode_json(payload, 0, 100).body == "é".encode()


def test_json_headers_may_be_null() -> None:
    call = wire.decode_json(b'{"id":"i","app":"a","fn":"f","headers":null}', 0, 100)
    assert dict(call.headers) == {}


def test_fields_round_trip() -> None:
    call = Call(
        id="r-1",
        app="a",
        fn="f",
        body=b"\xffbin",
        headers={"K": "v"},
        priority=1,
        created_at=datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    )
    encoded = wire.call_fields(call, 1, delay_s=2.0, prior_deliveries=4)
    parsed = wire.decode_fields(encoded, 100)
    assert parsed.call == call
    assert (parsed.priority, parsed.delay_s, parsed.prior_deliveries) == (1, 2.0, 4)


def test_json_round_trip_text_and_binary() -> None:
    for body in (b"text \xc3\xa9", b"\xff\x00"):
        call = Call(
            id="j-1",
            app="a",
            fn="f",
            body=body,
            headers={"K": "v"},
            created_at=datetime(2024, 1, 2, tzinfo=UTC),
        )
        assert wire.decode_json(wire.call_json(call), 0, 100) == call


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"id":"i","app":"a"}', "'fn'"),
        (b'{"id":"i","app":"a","fn":"f","body":"x","body_b64":"eA=="}', "both"),
        (b'{"id":"i","app":"a","fn":"f","body_b64":"***"}', "base64"),
        (b'{"id":"i","app":"a","fn":"f","body":"\\udcff"}', "body is not UTF-8"),
        (b'{"id":"i","app":"\\udcff","fn":"f"}', "app"),
        (b'{"id":"i","app":"a","fn":"f","created":"yesterday"}', "created"),
        (b'{"id":"i","app":"a","fn":"f","created":1e300}', "created"),
        (b'{"id":"i","app":"a","fn":"f","created":99999999999999999999999}', "created"),
        (b'{"id":"i","app":"a","fn":"f","created":' + b"9" * 4301 + b"}", "not JSON"),
        (b'{"id":"i","app":"a","fn":"f","headers":' + b"[" * 5000, "not JSON"),
        ("[" * 5000, "not JSON"),
        (b'{"id":"i","app":"a","fn":"f","headers":[]}', "JSON object"),
        (b'{"id":"i","app":"a","fn":"f","headers":false}', "JSON object"),
        (b'{"id":"i","app":"a","fn":"f","headers":""}', "JSON object"),
        # Which of two values was meant cannot be told (json.loads keeps the last).
        (b'{"id":"i","app":"a","fn":"f","fn":"g"}', "JSON key 'fn' is given more than once"),
        (
            b'{"id":"i","app":"a","fn":"f","headers":{"A":"1","A":"2"}}',
            "JSON key 'A' is given more than once",
        ),
        (b"\xef\xbb\xbf" + b'{"id":"i","app":"a","fn":"f","id":"j"}', "JSON key 'id'"),
        # Fields of the stream form only: a payload's would be ignored.
        (b'{"id":"i","app":"a","fn":"f","delay":30}', "unknown field\\(s\\) 'delay'"),
        (b'{"id":"i","app":"a","fn":"f","priority":2}', "unknown field\\(s\\) 'priority'"),
        (b'{"id":"i","app":"a","fn":"f","colour":"red"}', "unknown field\\(s\\) 'colour'"),
    ],
)
def test_malformed_json_says_why(payload: bytes | str, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_json(payload, 0, 100)


@pytest.mark.parametrize(
    ("created", "ms"),
    [
        (datetime(2305, 1, 29, 10, 57, 46, 748000, tzinfo=UTC), 10574017066748),  # was .747999
        (datetime(6398, 7, 14, 18, 14, 24, 291000, tzinfo=UTC), 139751028864291),  # was ...290
        (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC), wire.MAX_CREATED_MS),
    ],
)
def test_created_times_round_trip_to_the_millisecond(created: datetime, ms: int) -> None:
    assert wire.ms_of(created) == ms
    assert wire.from_ms(ms) == created
    call = Call(id="c", app="a", fn="f", created_at=created)
    assert wire.decode_fields(wire.call_fields(call, 0), 0).call == call
    assert wire.decode_json(wire.call_json(call), 0, 0) == call
