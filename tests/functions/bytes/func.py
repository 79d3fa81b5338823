"""Returns as many bytes as the body asks for ({"size": 1024} or 1024)."""

import json


def handler(ctx, data=None):
    raw = data.getvalue().strip() if data is not None else b""
    value = json.loads(raw) if raw else 0
    size = int(value.get("size", 0) if isinstance(value, dict) else value)
    return b"x" * size
