"""Speaks the hot-function contract by hand and tries what a hostile function would.

The request body is JSON, {"do": WHAT, ...}; WHAT is one of:

- ``probe``: answer with a JSON object of what the process may do (user,
  capabilities, limits, mounts, network).
- ``relink_pipes``: replace the output pipes in the socket directory by
  symlinks to ``target`` (a path on the host), then answer.
- ``silent``: read the request and never answer.
- ``drip_head``: a status line, then a header of ``kb`` KiB in writes of
  ``piece`` bytes, ``every`` s apart, then the rest of the answer.
- ``headers``: answer with ``n`` headers, each named ``prefix`` plus a number
  and ``size`` bytes long.
"""

import json
import os
import resource
import socket
import time

DIR = "/tmp/iofs"
LISTENER = os.environ.get("FN_LISTENER", "unix:/tmp/iofs/lsnr.sock")[len("unix:"):]


def answer(body=b"ok", status=200, extra=""):
    head = f"HTTP/1.1 {status} OK\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def read_request(conn, buf):
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
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


def status_fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
                out[key] = value.strip()
    return out


def can_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        return True
    except OSError:
        return False


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"error: {exc.strerror}"


def probe():
    st = os.statvfs("/tmp")
    limits = {
        name: resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))[1]
        for name in ("nofile", "memlock", "sigpending", "msgqueue", "nproc")
    }
    mounts = [line.split()[1:4] for line in read("/proc/self/mounts").splitlines()]
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "status": status_fields(),
        "root_writable": can_write("/fnq-probe"),
        "tmp_bytes": st.f_blocks * st.f_frsize,
        "limits": limits,
        "mounts": mounts,
        "net": [line.split(":")[0].strip() for line in read("/proc/net/dev").splitlines()[2:]],
        "pid1": read("/proc/1/cmdline").split("\0")[0],
        "mem": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        "memsw": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
        "pids": read("/sys/fs/cgroup/pids/pids.max"),
    }


def relink_pipes(target):
    for name in (".fnq-stdout", ".fnq-stderr"):
        tmp = f"{DIR}/{name}.new"
        os.symlink(target, tmp)
        os.rename(tmp, f"{DIR}/{name}")


def serve(conn):
    buf = b""
    while True:
        got = read_request(conn, buf)
        if got is None:
            return
        _head, body, buf = got
        req = json.loads(body or b"{}")
        what = req.get("do", "ok")
        if what == "probe":
            conn.sendall(answer(json.dumps(probe()).encode()))
        elif what == "relink_pipes":
            relink_pipes(req["target"])
            conn.sendall(answer(b"relinked"))
        elif what == "silent":
            continue
        elif what == "drip_head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Long: ")
            piece, every = b"a" * int(req.get("piece", 64)), float(req.get("every", 0))
            for _ in range(int(req.get("kb", 1024)) * 1024 // len(piece)):
                conn.sendall(piece)
                if every:
                    time.sleep(every)
            conn.sendall(b"\r\nContent-Length: 2\r\n\r\nok")
        elif what == "headers":
            size, prefix = int(req.get("size", 100)), req.get("prefix", "X-")
            extra = "".join(
                f"{prefix}{i}{'n' * max(0, size - len(prefix) - len(str(i)))}: v\r\n"
                for i in range(int(req.get("n", 1)))
            )
            conn.sendall(answer(b"headers", extra=extra))
        else:
            conn.sendall(answer(f"unknown {what!r}".encode(), 400))


def main():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(f"{DIR}/hostile.sock")
    os.chmod(f"{DIR}/hostile.sock", 0o666)
    sock.listen(8)
    os.symlink("hostile.sock", LISTENER)
    while True:
        conn, _ = sock.accept()
        try:
            serve(conn)
        except OSError:
            pass
        finally:
            conn.close()


main()
