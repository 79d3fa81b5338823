"""Speaks the hot-function contract by hand, and misbehaves on request.

The request body is JSON, {"do": WHAT, ...}; WHAT is one of:

- ``ok``: answer 200 "ok".
- ``flood``: write ``mb`` MiB to ``stream`` ("out" or "err"; in lines unless
  ``lines`` is false), then answer.
- ``flood_after``: answer, then write ``mb`` MiB to ``stream``.
- ``drip``: a head with Content-Length ``size``, then one byte every ``every`` s.
- ``endless_head``: a status line, then a header line every 0.05 s, forever.
- ``chunks``: a 200 answer of ``n`` chunks of one byte each.
- ``short_body``: Content-Length 100, ten bytes, then the connection held open.
- ``twice``: the answer, then the same answer again.
- a request with the header ``X-Early: yes`` is answered before its body is
  read (the body is left on the connection).
- ``die``: raise an exception: the connection closes (``finally``), then the
  traceback goes to stderr and the process exits 1.
- ``exit_after``: answer, then exit 0.
- ``fork_hold``: a child that keeps stdout, stderr and the socket and sleeps;
  the main process answers and exits.
- ``child_writes``: answer; a child keeps writing a line to stdout every 0.01 s.
- ``fill_dir``: create ``n`` files of ``kb`` KiB in the socket directory.
- ``deep_dir``: create directories ``depth`` levels deep in the socket directory.
- ``replace``: answer, close, then replace lsnr.sock by ``with`` ("file",
  "dir", "fifo" or "link" to a name in the directory that is no socket).
- ``ignore_term``: answer; from now on SIGTERM is ignored.
- ``hang_up``: close the connection without answering; the process lives on and
  takes the next connection.
- ``stop_accepting``: answer and close; the process lives on and never accepts
  another connection (the next ones wait in the listener's backlog).
- ``jam``: fill the listener's backlog with connections of its own, answer and
  close; it never accepts again: the next connection finds no room.
- ``close_listener``: close the listening socket, then answer and close; the
  process lives on (the next connections are refused).
- and what a hostile function tries: see hostile.py.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

import hostile

DIR = "/tmp/iofs"
LISTENER = os.environ.get("FN_LISTENER", "unix:/tmp/iofs/lsnr.sock")[len("unix:"):]
LISTENING = []  # the listening socket, once made (close_listener closes it)


def answer(body=b"ok", status=200, close=False, extra=""):
    extra += "Connection: close\r\n" if close else ""
    head = f"HTTP/1.1 {status} OK\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def read_request(conn, buf):
    """(head, body, rest) of the next request; None when the peer closed."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    if b"\r\nx-early: yes" in head.lower():
        conn.sendall(answer(b"early"))  # the body stays where it is
        return read_request(conn, buf)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return head, buf[:length], buf[length:]


def write(stream, mb, lines=True):
    out = sys.stdout.buffer if stream == "out" else sys.stderr.buffer
    unit = (b"x" * 1023 + b"\n") if lines else b"y" * 1024
    block = unit * 1024
    for _ in range(int(mb)):
        out.write(block)
    out.flush()


def fill_dir(n, kb):
    data = b"z" * (int(kb) * 1024)
    for i in range(int(n)):
        with open(f"{DIR}/junk-{i}", "wb") as f:
            f.write(data)


def deep_dir(depth):
    fd = os.open(DIR, os.O_RDONLY)
    for _ in range(int(depth)):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def replace(what):
    tmp = f"{DIR}/new-lsnr"
    if what == "file":
        open(tmp, "w").close()
    elif what == "dir":
        os.mkdir(tmp)
    elif what == "fifo":
        os.mkfifo(tmp)
    else:
        open(f"{DIR}/plain", "w").close()
        os.symlink("plain", tmp)
    if what == "dir":
        os.unlink(LISTENER)
    os.rename(tmp, LISTENER)


def child_writes():
    if os.fork() == 0:
        while True:
            print("child line", flush=True)
            time.sleep(0.01)


def jam():
    """Connect to the own listener until its backlog is full; the connections are kept."""
    held = []
    while True:
        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        own.setblocking(False)
        try:
            own.connect(LISTENER)
        except BlockingIOError:
            own.close()
            return held
        held.append(own)


def serve(conn):
    buf = b""
    while True:
        got = read_request(conn, buf)
        if got is None:
            return
        head, body, buf = got
        req = json.loads(body or b"{}")
        what = req.get("do", "ok")
        if what == "ok":
            conn.sendall(answer())
        elif what == "flood":
            write(req.get("stream", "out"), req.get("mb", 50), req.get("lines", True))
            conn.sendall(answer())
        elif what == "flood_after":
            conn.sendall(answer())
            write(req.get("stream", "out"), req.get("mb", 50), req.get("lines", True))
        elif what == "drip":
            size = int(req.get("size", 100))
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
            for _ in range(size):
                conn.sendall(b"d")
                time.sleep(float(req.get("every", 0.5)))
        elif what == "endless_head":
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while True:
                conn.sendall(b"X-More: yes\r\n")
                time.sleep(0.05)
        elif what == "chunks":
            n = int(req.get("n", 10000))
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            conn.sendall(b"1\r\nc\r\n" * n + b"0\r\n\r\n")
        elif what == "short_body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            time.sleep(3600)
        elif what == "twice":
            conn.sendall(answer(b"first"))
            conn.sendall(answer(b"second"))
        elif what == "die":
            raise RuntimeError("the function's last words")
        elif what == "exit_after":
            conn.sendall(answer())
            os._exit(0)
        elif what == "fork_hold":
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)
            conn.sendall(answer())
            os._exit(0)
        elif what == "child_writes":
            child_writes()
            conn.sendall(answer())
        elif what == "fill_dir":
            fill_dir(req.get("n", 1000), req.get("kb", 1))
            conn.sendall(answer())
        elif what == "deep_dir":
            deep_dir(req.get("depth", 2000))
            conn.sendall(answer())
        elif what == "replace":
            conn.sendall(answer(b"replaced", close=True))
            conn.close()
            replace(req.get("with", "file"))
            return
        elif what == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            conn.sendall(answer())
        elif what == "hang_up":
            return
        elif what == "stop_accepting":
            conn.sendall(answer(close=True))
            conn.close()
            time.sleep(3600)
        elif what == "jam":
            kept = jam()  # held open while the process sleeps
            conn.sendall(answer(close=True))
            conn.close()
            time.sleep(3600)
        elif what == "close_listener":
            LISTENING[0].close()  # before the answer: no next connection gets in first
            conn.sendall(answer(close=True))
            conn.close()
            time.sleep(3600)
        elif hostile.handle(conn, what, req, answer):
            pass
        else:
            conn.sendall(answer(f"unknown {what!r}".encode(), 400))


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(f"{DIR}/misbehave.sock")
    os.chmod(f"{DIR}/misbehave.sock", 0o666)
    sock.listen(8)
    LISTENING.append(sock)
    os.symlink("misbehave.sock", LISTENER)  # ready: listening already
    while True:
        conn, _ = sock.accept()
        try:
            serve(conn)
        except OSError:
            pass
        finally:
            conn.close()


main()
