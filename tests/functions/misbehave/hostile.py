"""What a hostile function tries, for tests/functions/misbehave (``do`` values):

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
import time

DIR = "/tmp/iofs"


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


def handle(conn, what, req, answer):
    """Do ``what`` if it is one of the above; False if it is not."""
    if what == "probe":
        conn.sendall(answer(json.dumps(probe()).encode()))
    elif what == "relink_pipes":
        relink_pipes(req["target"])
        conn.sendall(answer(b"relinked"))
    elif what == "silent":
        pass
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
        return False
    return True
