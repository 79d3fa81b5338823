"""remove_tree: a socket directory goes whatever the function left in it."""

from __future__ import annotations

import os
from pathlib import Path

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
