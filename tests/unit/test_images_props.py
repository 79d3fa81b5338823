"""Properties of the fnq.toml manifest: any file gives a function or one error naming the
file and the key, a good manifest reads back as written, and every value reaches the
Dockerfile as a word the engine reads back unchanged."""

from __future__ import annotations

import json
import math
import re
import string
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.images import ImageBuildError, load_function

# The rules of docs/functions.md "The manifest (optional)", stated again.
NAME_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DIR = "fn"


def name_ok(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 128 and bool(NAME_RE.fullmatch(value.lower()))


def entrypoint_ok(value: object) -> bool:
    if not isinstance(value, list) or not 1 <= len(value) <= 64:
        return False
    if not all(isinstance(a, str) and "\0" not in a and len(a.encode()) <= 4096 for a in value):
        return False
    return value[0] != ""


def env_ok(value: object) -> bool:
    if not isinstance(value, dict) or len(value) > 256:
        return False
    for key, val in value.items():
        if not (len(key) <= 128 and ENV_KEY_RE.fullmatch(key)):
            return False
        if not isinstance(val, str) or set(val) & {"\0", "\r", "\n"} or len(val.encode()) > 16384:
            return False
    return True


CHECKS = {"name": name_ok, "entrypoint": entrypoint_ok, "env": env_ok}


def bad_keys(doc: dict[str, Any]) -> set[str]:
    return {k for k, v in doc.items() if k not in CHECKS or not CHECKS[k](v)}


# ------------------------------------------------------------------ a TOML writer


def toml_str(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_str(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_doc(doc: dict[str, Any], env_as_table: bool) -> str:
    lines = [f"{toml_str(k)} = {toml_value(v)}" for k, v in doc.items() if k != "env"]
    env = doc.get("env")
    if "env" in doc and env_as_table and isinstance(env, dict):
        lines.append("[env]")
        lines += [f"{toml_str(k)} = {toml_value(v)}" for k, v in env.items()]
    elif "env" in doc:
        lines.append(f"env = {toml_value(env)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ strategies

texts = st.text(max_size=12) | st.text(string.printable, max_size=12)
scalars = (
    texts
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.dates(min_value=date(1000, 1, 1))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
good_names = st.from_regex(r"[a-z0-9]{1,8}(?:(?:[._]|__|-+)[a-z0-9]{1,8}){0,3}", fullmatch=True)
env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
line_text = st.text(st.characters(exclude_characters="\0\r\n"), max_size=30)
arg_text = st.text(st.characters(exclude_characters="\0"), max_size=30)
# Values the shell and the Dockerfile treat specially, to meet often.
tricky = st.text(st.sampled_from(list("$\"\\'`{} \t=#;&|\u00e9\u2028\U0001f600x")), max_size=12)


def near(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Any value, or sometimes one of the right shape."""
    return strategy | values


manifests = st.fixed_dictionaries(
    {},
    optional={
        "name": near(good_names | texts),
        "entrypoint": near(st.lists(arg_text | tricky | values, max_size=3)),
        "env": near(st.dictionaries(env_keys | texts, line_text | tricky | values, max_size=3)),
        "entry_point": values,
        "Name": values,
    },
)
good_manifests = st.fixed_dictionaries(
    {},
    optional={
        "name": good_names,
        "entrypoint": st.lists(arg_text | tricky, min_size=1, max_size=4).filter(
            lambda a: a[0] != ""
        ),
        "env": st.dictionaries(env_keys, line_text | tricky, max_size=4),
    },
)


@pytest.fixture(scope="module")
def fn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("props") / DIR
    path.mkdir()
    (path / "func.py").write_text("def handler(ctx, data=None):\n    return 'ok'\n")
    return path


def load(fn_dir: Path, data: bytes) -> Any:
    (fn_dir / "fnq.toml").write_bytes(data)
    return load_function(fn_dir)


# ------------------------------------------------------------------ reading


@settings(max_examples=200)
@given(st.binary(max_size=80) | st.text(max_size=40).map(str.encode))
def test_any_bytes_give_a_function_or_one_error_naming_the_file(fn_dir: Path, data: bytes) -> None:
    try:
        fn = load(fn_dir, data)
    except ImageBuildError as exc:
        assert str(exc).startswith(f"{fn_dir / 'fnq.toml'}: ")
        return
    assert fn.name == DIR and fn.entrypoint is None and dict(fn.env) == {}  # an empty document


@settings(max_examples=300)
@given(manifests, st.booleans())
def test_any_document_is_the_plan_it_says_or_an_error_naming_a_bad_key(
    fn_dir: Path, doc: dict[str, Any], env_as_table: bool
) -> None:
    file = fn_dir / "fnq.toml"
    bad = bad_keys(doc)
    try:
        fn = load(fn_dir, toml_doc(doc, env_as_table).encode())
    except ImageBuildError as exc:
        message = str(exc)
        assert bad, message
        assert "\n" not in message
        assert any(
            message.startswith(f"{file}: {key}")
            if key in CHECKS
            else message.startswith(f"{file}: unknown key {key!r}")
            for key in bad
        ), message
        return
    assert not bad
    assert fn.name == str(doc.get("name", DIR)).lower()
    assert fn.image == f"fnq/{fn.name}:latest"
    entry = doc.get("entrypoint")
    assert fn.entrypoint == (tuple(entry) if entry is not None else None)
    assert dict(fn.env) == doc.get("env", {})


@settings(max_examples=200)
@given(good_manifests, st.booleans())
def test_a_good_manifest_reads_back_as_written(
    fn_dir: Path, doc: dict[str, Any], env_as_table: bool
) -> None:
    fn = load(fn_dir, toml_doc(doc, env_as_table).encode())
    assert fn.name == doc.get("name", DIR)
    assert fn.entrypoint == (tuple(doc["entrypoint"]) if "entrypoint" in doc else None)
    assert dict(fn.env) == doc.get("env", {})


@settings(max_examples=40)
@given(
    st.sampled_from(["x", "\u00e9", "\U0001f600"]),
    st.integers(0, 20_000),
    st.sampled_from(["env", "entrypoint", "name"]),
)
def test_long_values_are_taken_up_to_their_limit_in_bytes(
    fn_dir: Path, unit: str, count: int, key: str
) -> None:
    value = unit * count
    doc: dict[str, Any] = {
        "env": {"BIG": value},
        "entrypoint": ["/bin/prog", value],
        "name": value,
    }
    size = len(value.encode())
    if key == "name":  # ASCII only, so its length in characters is its length in bytes
        good = unit == "x" and 1 <= count <= 128
    else:
        good = size <= {"env": 16384, "entrypoint": 4096}[key]
    source = toml_doc({key: doc[key]}, env_as_table=True).encode()
    try:
        fn = load(fn_dir, source)
    except ImageBuildError as exc:
        assert not good and str(exc).startswith(f"{fn_dir / 'fnq.toml'}: {key}")
        return
    assert good
    assert {"env": dict(fn.env), "entrypoint": list(fn.entrypoint or ()), "name": fn.name}[
        key
    ] == doc[key]


# ------------------------------------------------------------------ the Dockerfile


def read_double_quoted(word: str) -> str:
    """A Dockerfile ENV word the way the engine's shell lexer reads it: inside double
    quotes a backslash escapes only ``"``, ``$`` and itself; ``$`` expands a variable."""
    assert word.startswith('"') and word.endswith('"') and len(word) >= 2, word
    out, i, body = [], 0, word[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in '"$\\':
            out.append(body[i + 1])
            i += 2
            continue
        assert ch not in '"$', f"unescaped {ch!r} in {word!r}"  # an early end, an expansion
        out.append(ch)
        i += 1
    return "".join(out)


@settings(max_examples=300)
@given(good_manifests, st.booleans())
def test_the_dockerfile_carries_every_value_as_one_word(
    fn_dir: Path, doc: dict[str, Any], env_as_table: bool
) -> None:
    fn = load(fn_dir, toml_doc(doc, env_as_table).encode())
    lines = fn.dockerfile("fnq/python-fdk:1").split("\n")
    assert lines.pop() == ""  # ends with a newline
    assert lines[:2] == ["FROM fnq/python-fdk:1", "COPY . /function/"]
    env = doc.get("env", {})
    assert len(lines) == 2 + len(env) + ("entrypoint" in doc)
    read: dict[str, str] = {}
    for line in lines[2 : 2 + len(env)]:
        assert not line.rstrip(" \t").endswith("\\")  # no line continues into the next
        match = re.fullmatch(r"ENV ([A-Za-z_][A-Za-z0-9_]*)=(.*)", line, re.DOTALL)
        assert match, line
        read[match[1]] = read_double_quoted(match[2])
    assert read == env
    if "entrypoint" in doc:
        verb, _, rest = lines[-1].partition(" ")
        assert verb == "ENTRYPOINT" and json.loads(rest) == doc["entrypoint"]
        assert rest.isascii()  # JSON escapes, read back by the engine's JSON parser
