"""The example function: greets the name given in a JSON body.

    {"name": "Ada"}  ->  {"message": "Hello, Ada!"}

The greeting is the function's config GREETING (which reaches the container
as an environment variable: `fnq fn create ... --config GREETING=hi` makes it
"hi, Ada!"), "Hello" when unset. Anything it prints to stderr (or stdout)
lands in the call's log.
"""

import json
import os
import sys

from fdk import response


def handler(ctx, data=None):
    raw = data.getvalue() if data is not None else b""
    name = "world"
    if raw.strip():
        try:
            name = str(json.loads(raw).get("name", name))
        except (ValueError, AttributeError):
            name = raw.decode("utf-8", "replace").strip() or name
    greeting = os.environ.get("GREETING") or "Hello"
    print(f"greeting {name} (call {ctx.CallID()})", file=sys.stderr)
    return response.Response(
        ctx,
        response_data=json.dumps({"message": f"{greeting}, {name}!"}),
        headers={"Content-Type": "application/json"},
    )
