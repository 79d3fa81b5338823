"""The README's Python examples for producers type-check under mypy --strict, as a
producer's own code would against the typed packages (py.typed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def producer_examples() -> dict[str, str]:
    """The Python blocks of "Enqueueing calls", one module per subsection (an example
    may use a name an earlier one of its subsection defined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Enqueueing calls")
    section = text[start : text.index("\n## ", start)]
    out: dict[str, str] = {}
    for part in section.split("\n### ")[1:]:
        blocks = re.findall(r"```python\n(.*?)```", part, re.S)
        if blocks:
            out[part.split("\n", 1)[0]] = "\n".join(blocks)
    return out


def test_the_readme_producer_examples_type_check(tmp_path: Path) -> None:
    examples = producer_examples()
    assert set(examples) == {"From Python", "From an app that already uses RQ"}
    files = []
    for i, code in enumerate(examples.values()):
        path = tmp_path / f"example_{i}.py"
        path.write_text(code)
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
