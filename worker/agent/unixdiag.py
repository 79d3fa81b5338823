"""Whether a unix stream connection has been accepted, from the connecting side.

A unix ``connect`` completes as soon as the listener's backlog has room: the
kernel queues the connection, and the client may write its request, before
the listening process accepts it, or if it never does. The kernel's socket
diagnostics (``NETLINK_SOCK_DIAG``, the ``unix_diag`` module) tell the two
apart: the peer end of a connection still in the backlog belongs to no open
socket yet, so its inode reads 0; accepting it gives it one. One query is a
few system calls; the worker asks only about a call that timed out on a
connection that never brought an answer.

The peer end is made in the connecting socket's network namespace, so the
query works for a function in a container of its own (``--network none``).
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 2
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2
NO_COOKIE = 0xFFFFFFFF
QUERY_TIMEOUT_S = 0.5  # a local kernel query; this only bounds a kernel that never answers

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_REQUEST = struct.Struct("=BBHIIIII")  # unix_diag_req: family, protocol, pad, states, ino,
# show, cookie[2]
_MESSAGE = struct.Struct("=BBBBIII")  # unix_diag_msg: family, type, state, pad, ino, cookie[2]
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_U32 = struct.Struct("=I")


def socket_inode(fd: int) -> int:
    """The inode of socket ``fd`` (what :func:`peer_accepted` asks about)."""
    return os.fstat(fd).st_ino


def peer_accepted(inode: int) -> bool | None:
    """True once the peer end of the connected unix socket ``inode`` has been accepted,
    False while it waits in its listener's backlog; None when the kernel does not
    tell (no such socket, not connected, no ``unix_diag``, an error)."""
    request = _REQUEST.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, UDIAG_SHOW_PEER, NO_COOKIE, NO_COOKIE
    )
    header = _HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(QUERY_TIMEOUT_S)
            nl.sendto(header + request, (0, 0))
            answer = nl.recv(8192)
    except OSError:  # also TimeoutError
        return None
    return _peer_inode(answer, inode)


def _peer_inode(answer: bytes, inode: int) -> bool | None:
    if len(answer) < _HEADER.size + _MESSAGE.size:
        return None
    length, kind, _, _, _ = _HEADER.unpack_from(answer)
    if kind != SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: no such socket, say
        return None
    *_, ino, _, _ = _MESSAGE.unpack_from(answer, _HEADER.size)
    if ino != inode:
        return None
    offset = _HEADER.size + _MESSAGE.size
    end = min(length, len(answer))
    while offset + _ATTR.size <= end:
        size, kind = _ATTR.unpack_from(answer, offset)
        if size < _ATTR.size:
            return None
        if kind == UNIX_DIAG_PEER and size >= _ATTR.size + _U32.size:
            peer: int = _U32.unpack_from(answer, offset + _ATTR.size)[0]
            return peer != 0
        offset += (size + 3) & ~3
    return None  # no peer: not connected
