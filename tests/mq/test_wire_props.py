"""Properties of the wire format: valid calls round-trip, anything else is a WireError."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from config.domain import CALL_ID_RE, Call
from mq import wire

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TOKEN = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"


def name_ok(s: str) -> bool:
    try:
        wire.check_name("app", s)
    except wire.WireError:
        return False
    return True


ids = st.from_regex(CALL_ID_RE, fullmatch=True)
# Any characters but whitespace, '/', controls and lone surrogates.
names = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], exclude_characters="/"),
    min_size=1,
    max_size=40,
).filter(name_ok)
# Header values: no control characters but the tab, no lone surrogates.
CONTROLS = [chr(c) for c in (*range(0x09), *range(0x0A, 0x20), 0x7F)]
header_values = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters=CONTROLS), max_size=30
)
headers = st.dictionaries(st.text(TOKEN, min_size=1, max_size=20), header_values, max_size=5)
created_ms = st.integers(0, wire.MAX_CREATED_MS) | st.sampled_from([0, wire.MAX_CREATED_MS])
delays = st.just(0.0) | st.floats(0.0, wire.MAX_DELAY_S, allow_nan=False)


@st.composite
def calls(draw: st.DrawFn) -> Call:
    return Call(
        id=draw(ids),
        app=draw(names),
        fn=draw(names),
        body=draw(st.binary(max_size=300) | st.text(max_size=100).map(str.encode)),
        headers=draw(headers),
        created_at=EPOCH + timedelta(milliseconds=draw(created_ms)),
        priority=draw(st.integers(0, wire.MAX_PRIORITY)),
    )


@settings(max_examples=300)
@given(calls(), delays, st.integers(0, 1000), st.booleans())
def test_stream_fields_round_trip(call: Call, delay: float, prior: int, byte_keys: bool) -> None:
    fields = wire.call_fields(call, call.priority, delay_s=delay, prior_deliveries=prior)
    raw = {k.encode(): v for k, v in fields.items()} if byte_keys else fields
    parsed = wire.decode_fields(raw, len(call.body))
    assert parsed.call == call
    assert (parsed.priority, parsed.delay_s, parsed.prior_deliveries) == (
        call.priority,
        delay,
        prior,
    )


@settings(max_examples=300)
@given(calls(), st.booleans())
def test_json_round_trips(call: Call, as_text: bool) -> None:
    payload = wire.call_json(call)
    assert (
        wire.decode_json(payload.decode() if as_text else payload, call.priority, len(call.body))
        == call
    )


@given(created_ms)
def test_created_ms_round_trips_exactly(ms: int) -> None:
    when = wire.from_ms(ms)
    assert when == EPOCH + timedelta(milliseconds=ms)
    assert wire.ms_of(when) == ms
    assert wire.ms_of(when + timedelta(microseconds=999)) == ms


# ------------------------------------------------------------- malformed input

# JSON texts: valid documents, and the edges of what json.loads takes.
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_texts = (
    json_docs.map(json.dumps)
    | st.integers(1, 6000).map(lambda n: "9" * n)  # past the int() digit limit
    | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)  # nested past the recursion limit
    | st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)
    | st.text(max_size=30)
)
field_values = (
    st.binary(max_size=40)
    | json_texts.map(str.encode)
    | st.sampled_from(
        ["0", "1", "2", "-1", " 7 ", "1_0", "\u0661", "\u00b2", "1e400", "nan", "0.5", ""]
    ).map(str.encode)
)
field_names = st.sampled_from(
    ["app", "fn", "body", "id", "headers", "priority", "delay", "created", "_n", "_x", "body_b64"]
) | st.text(max_size=6)


@st.composite
def field_maps(draw: st.DrawFn) -> dict[str, bytes]:
    """The fields of a valid call, some dropped, some replaced, some added."""
    call = draw(calls())
    fields = wire.call_fields(call, call.priority, prior_deliveries=draw(st.integers(0, 3)))
    for name in draw(st.sets(st.sampled_from(sorted(fields)))):
        del fields[name]
    fields.update(draw(st.dictionaries(field_names, field_values, max_size=4)))
    return fields


@settings(max_examples=500)
@given(
    field_maps() | st.dictionaries(field_names, field_values, max_size=9),
    st.booleans(),
    st.integers(0, 50),
)
def test_any_fields_give_a_call_or_a_wire_error(
    fields: dict[str, bytes], byte_keys: bool, max_body: int
) -> None:
    raw = (
        {k.encode("utf-8", "surrogatepass"): v for k, v in fields.items()} if byte_keys else fields
    )
    try:
        parsed = wire.decode_fields(raw, max_body, default_id="d", default_created_ms=5)
    except wire.WireError:
        return
    # What comes out is a call the wire format accepts as it is, from these fields.
    wire.check_call(parsed.call, parsed.priority, parsed.delay_s, max_body)
    assert parsed.call.body == fields.get("body", b"")
    assert (parsed.call.app, parsed.call.fn) == (fields["app"].decode(), fields["fn"].decode())


@settings(max_examples=300)
@given(json_texts)
def test_valid_fields_with_any_headers_text(text: str) -> None:
    raw = {"app": b"a", "fn": b"f", "id": b"i", "headers": text.encode()}
    try:
        parsed = wire.decode_fields(raw, 10)
    except wire.WireError:
        return
    assert dict(parsed.call.headers) == (json.loads(text) if text else {})


@st.composite
def payloads(draw: st.DrawFn) -> object:
    """The JSON form of a valid call with fields dropped, replaced or added; any JSON
    text; or a value of another type. Text as str or as bytes."""
    kind = draw(st.sampled_from(["call", "call", "text", "other"]))
    if kind == "other":
        return draw(json_docs | st.binary(max_size=20).map(bytearray))
    if kind == "text":
        text = draw(json_texts)
    else:
        doc = json.loads(wire.call_json(draw(calls())))
        for name in draw(st.sets(st.sampled_from(sorted(doc)))):
            del doc[name]
        values = (
            json_docs | created_ms | st.binary(max_size=20).map(base64.b64encode).map(bytes.decode)
        )
        doc.update(draw(st.dictionaries(field_names, values, max_size=3)))
        text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


@settings(max_examples=600)
@given(payloads(), st.integers(-1, 3), st.integers(0, 50))
def test_any_payload_gives_a_call_or_a_wire_error(
    payload: object, priority: int, max_body: int
) -> None:
    try:
        call = wire.decode_json(payload, priority, max_body, default_created_ms=5)
    except wire.WireError:
        return
    wire.check_call(call, priority, 0.0, max_body)
