"""Raises an exception: the FDK answers 502 and writes the traceback to stderr."""


class Boom(Exception):
    pass


def handler(ctx, data=None):
    raise Boom("raised on purpose")
