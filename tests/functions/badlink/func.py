"""Listens on a socket outside the socket directory and points lsnr.sock at it.

The agent must refuse the link: it may only name a file in the same directory.
"""

import os
import socket
import time

listener = os.environ.get("FN_LISTENER", "unix:/tmp/iofs/lsnr.sock")
link = listener[len("unix:"):]
elsewhere = "/tmp/elsewhere.sock"
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(elsewhere)
sock.listen(1)
os.symlink(elsewhere, link)
while True:
    time.sleep(3600)
