"""remove_tree: a socket directory goes whatever the function left in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.agent import iofs
from worker.agent.iofs import remove_tree


def test_a_tree_deeper_than_the_recursion_limit_and_path_max_goes(tmp_path: Path) -> None:
    top = tmp_path / "iofs"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    try:
        for i in range(3000):  # 6000 bytes of path: over PATH_MAX, and 3000 levels
            os.mkdir("d", dir_fd=fd)
            os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)
    remove_tree(top)
    assert not top.exists()


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = tmp_path / "iofs"
    (top / "sub").mkdir(parents=True)
    (top / "to-dir").symlink_to(outside)
    (top / "sub" / "to-file").symlink_to(outside / "keep")
    os.mkfifo(top / "fifo")
    remove_tree(top)
    assert not top.exists()
    assert (outside / "keep").read_text() == "x"


def test_a_path_that_is_gone_or_no_directory(tmp_path: Path) -> None:
    remove_tree(tmp_path / "never")  # no error
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    remove_tree(link)
    assert not link.is_symlink() and tmp_path.is_dir()


def test_a_directory_moved_up_during_the_removal_takes_it_no_higher_than_its_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way back up goes through "..": when something still running in the
    directory moves the one being emptied closer to the top, "..", counted as
    before, would lead above the top, and what is there would be removed."""
    base = tmp_path / "base"
    top = base / "iofs"
    (top / "a" / "b" / "c").mkdir(parents=True)
    (base / "other").mkdir()
    (base / "other" / "sock").write_text("another container's")
    (tmp_path / "host-file").write_text("precious")
    deepest = os.stat(top / "a" / "b" / "c").st_ino
    empty_files = iofs._empty_files

    def moving(fd: int, stuck: set[tuple[int, int]]) -> str | None:
        if os.fstat(fd).st_ino == deepest and (top / "a" / "b" / "c").exists():
            os.rename(top / "a" / "b" / "c", top / "c")  # two levels up
        return empty_files(fd, stuck)

    monkeypatch.setattr(iofs, "_empty_files", moving)
    remove_tree(top)
    assert (base / "other" / "sock").read_text() == "another container's"
    assert (tmp_path / "host-file").read_text() == "precious"
