"""Returns the process environment as a JSON object."""

import json
import os

from fdk import response


def handler(ctx, data=None):
    return response.Response(
        ctx,
        response_data=json.dumps(dict(os.environ), sort_keys=True),
        headers={"Content-Type": "application/json"},
    )
