"""Tables line up on a terminal whatever the characters in their cells."""

from __future__ import annotations

import unicodedata

import pytest

from worker.cli._common import print_table


def columns(text: str) -> int:
    """Terminal columns of ``text``, counted independently of the code under test."""
    wide = sum(unicodedata.east_asian_width(ch) in ("W", "F") for ch in text)
    marks = sum(unicodedata.category(ch) in ("Mn", "Me", "Cf") for ch in text)
    return len(text) + wide - marks


def test_second_column_starts_at_one_terminal_column_on_every_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = ["ab", "日本語", "cafe\u0301", "\uff46\uff55\uff4c\uff4c", "zero\u200bwidth"]
    print_table(["NAME", "STATUS"], [[name, "ok"] for name in names])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(names)
    starts = {columns(line[: line.rindex("  ") + 2]) for line in lines}
    assert starts == {columns("zero\u200bwidth") + 2}  # the widest cell, then the gap


def test_ascii_cells_are_padded_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["ID", "FN"], [["a", "x"], ["bbb", "y"]])
    assert capsys.readouterr().out.splitlines() == ["ID   FN", "a    x", "bbb  y"]
