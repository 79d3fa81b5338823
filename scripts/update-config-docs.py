"""Refresh the generated table in docs/configuration.md from the settings' own fields."""

from pathlib import Path

from worker.cli.config_cmd import markdown_table

START, END = "<!-- table:start -->\n", "<!-- table:end -->"
path = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = path.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
path.write_text(head + START + markdown_table() + END + tail)
print(f"updated {path}")
