"""Returns the request body unchanged, with the request's Content-Type."""

from fdk import response


def handler(ctx, data=None):
    body = data.getvalue() if data is not None else b""
    content_type = ctx.Headers().get("content-type", "application/octet-stream")
    return response.Response(ctx, response_data=body, headers={"Content-Type": content_type})
