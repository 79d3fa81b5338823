"""Exits the whole process in the middle of a call with the code in the body ({"code": 3} or 3)."""

import json
import os
import sys


def handler(ctx, data=None):
    raw = data.getvalue().strip() if data is not None else b""
    value = json.loads(raw) if raw else 1
    code = int(value.get("code", 1) if isinstance(value, dict) else value)
    print(f"exiting with {code}", file=sys.stderr, flush=True)
    os._exit(code)
