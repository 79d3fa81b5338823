"""Allocates (and touches) memory in 16 MiB steps up to the MB in the body, default 1024."""

import json
import sys


def handler(ctx, data=None):
    raw = data.getvalue().strip() if data is not None else b""
    value = json.loads(raw) if raw else 1024
    target_mb = int(value.get("mb", 1024) if isinstance(value, dict) else value)
    chunks = []
    for step in range(target_mb // 16):
        chunks.append(bytearray(16 * 1024 * 1024))
        print(f"allocated {(step + 1) * 16} MB", file=sys.stderr, flush=True)
    return f"allocated {target_mb} MB and survived"
