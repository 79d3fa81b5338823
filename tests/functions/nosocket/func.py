"""Never creates the listener socket: prints a line and sleeps until killed."""

import sys
import time

print("not listening on purpose", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
