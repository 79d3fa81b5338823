"""Properties of the check of the function's socket: for any directory of files, sockets,
pipes, folders and links, lsnr.sock is accepted exactly when the rule of iofs' docstring
says, and the only errors are ContainerInitFailed or FileNotFoundError (not there yet)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.agent.driver import SOCKET_NAME
from worker.agent.errors import ContainerInitFailed
from worker.agent.iofs import check_listener

KINDS = ("socket", "file", "dir", "fifo", "link")
names = st.sampled_from([SOCKET_NAME, "a", "b.sock", ".hidden", "x" * 255]) | st.text(
    st.characters(exclude_characters="/\0", codec="utf-8"), min_size=1, max_size=8
).filter(lambda n: n not in (".", ".."))
targets = (
    names
    | names.map(lambda n: "./" + n)
    | st.sampled_from([".", "..", "./", "./.", "./..", "../a", "/tmp/a", "sub/a", "a/", "x" * 300])
    | st.text(st.characters(exclude_characters="\0", codec="utf-8"), min_size=1, max_size=10)
)
targets = targets | st.integers(250, 300).map(lambda n: "x" * n)  # near NAME_MAX
others = st.dictionaries(names, st.tuples(st.sampled_from(KINDS), targets), max_size=5)
# lsnr.sock itself: half the time a link, else any kind or absent.
listener = (
    st.tuples(st.just("link"), targets) | st.none() | st.tuples(st.sampled_from(KINDS), targets)
)


@st.composite
def entries(draw: st.DrawFn) -> dict[str, tuple[str, str]]:
    found = draw(others)
    found.pop(SOCKET_NAME, None)
    mine = draw(listener)
    if mine is not None:
        found[SOCKET_NAME] = mine
    if mine is not None and mine[0] == "link" and draw(st.booleans()):
        # Often give the link's target a kind of its own.
        name = mine[1][2:] if mine[1].startswith("./") else mine[1]
        if name and "/" not in name and name not in (".", "..") and len(name) <= 255:
            found[name] = (draw(st.sampled_from(KINDS)), draw(targets))
    return found


def make(directory: Path, name: str, kind: str, target: str) -> None:
    path = directory / name
    if kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o600)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"")
    else:
        os.symlink(target, path)


def accepted(entries: dict[str, tuple[str, str]]) -> bool | None:
    """The rule, stated again: None when lsnr.sock does not exist yet."""
    if SOCKET_NAME not in entries:
        return None
    kind, target = entries[SOCKET_NAME]
    if kind != "link":
        return kind == "socket"
    name = target[2:] if target.startswith("./") else target
    if not name or "/" in name or name in (".", ".."):
        return False
    return entries.get(name, ("none", ""))[0] == "socket"


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fnq-iofs-props-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@settings(max_examples=400)
@given(entries())
def test_the_listener_is_taken_exactly_when_the_rule_says(
    root: Path, entries: dict[str, tuple[str, str]]
) -> None:
    directory = Path(tempfile.mkdtemp(dir=root))
    try:
        for name, (kind, target) in entries.items():
            make(directory, name, kind, target)
        expected = accepted(entries)
        if expected is None:
            with pytest.raises(FileNotFoundError):
                check_listener(directory)
        elif expected:
            check_listener(directory)
        else:
            with pytest.raises(ContainerInitFailed, match=f"the function's {SOCKET_NAME}"):
                check_listener(directory)
    finally:
        shutil.rmtree(directory)


@settings(max_examples=100)
@given(names.filter(lambda n: n != SOCKET_NAME), st.integers(1, 4))
def test_a_chain_of_links_is_refused_even_if_it_ends_at_a_socket(name: str, hops: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        os.mknod(directory / "real", stat.S_IFSOCK | 0o600)
        chain = [f"{name[:200]}{i}" for i in range(hops)]
        os.symlink(chain[0], directory / SOCKET_NAME)
        for here, there in zip(chain, [*chain[1:], "real"], strict=True):
            os.symlink(there, directory / here)
        with pytest.raises(ContainerInitFailed, match="is not a unix socket"):
            check_listener(directory)  # a link to a link: lstat sees the link, not the socket
