"""Sleeps for the number of seconds in the body ({"seconds": 1.5} or 1.5), then answers."""

import json
import time


def _number(data, key, default):
    raw = data.getvalue().strip() if data is not None else b""
    if not raw:
        return default
    value = json.loads(raw)
    return float(value.get(key, default) if isinstance(value, dict) else value)


def handler(ctx, data=None):
    seconds = _number(data, "seconds", 1.0)
    time.sleep(seconds)
    return f"slept {seconds}"
