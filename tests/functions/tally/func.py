"""Keeps a tally of its runs where the worker's host can read it.

Each run appends the call's id, one line, to runs.txt in the container's
socket directory (under FN_IOFS_PATH on the host), writes "tally <call id>"
to its log, and answers "run N", N the runs of its container so far.
"""

import os
import sys

TALLY = os.path.join(os.path.dirname(os.environ["FN_LISTENER"].split(":", 1)[1]), "runs.txt")


def handler(ctx, data=None):
    with open(TALLY, "a+") as tally:
        tally.write(ctx.CallID() + "\n")
        tally.seek(0)
        runs = len(tally.read().splitlines())
    print(f"tally {ctx.CallID()}", file=sys.stderr)
    return f"run {runs}"
