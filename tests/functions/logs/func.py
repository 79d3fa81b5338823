"""Writes N lines to stderr ({"lines": 10, "tag": "a"} or 10), then answers "done N".

Each line reads "<tag> line <i>", so a test can tell which call wrote it.
"""

import json
import sys


def handler(ctx, data=None):
    raw = data.getvalue().strip() if data is not None else b""
    value = json.loads(raw) if raw else 1
    if isinstance(value, dict):
        lines, tag = int(value.get("lines", 1)), str(value.get("tag", ctx.CallID()))
    else:
        lines, tag = int(value), ctx.CallID()
    for i in range(lines):
        sys.stderr.write(f"{tag} line {i}\n")
    sys.stderr.flush()
    return f"done {lines}"
