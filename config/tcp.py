"""TCP connections that notice a silent network.

A connection to a server on another host may go silent: packets dropped by a
firewall or a broken link, no reset, nothing to read. A connection waiting for
an answer then waits for whatever time limit its caller set, and one that
only waits (a blocking read) learns nothing until that limit passes; after
the network is back, a connection the server forgot meanwhile (it restarted,
or dropped the client) stays silent too. ``dead_after`` has the kernel end
such a connection: keepalive probes go out while it is idle, and once nothing
(probes' or data's acknowledgements) has come from the peer's host for about
the given time, the connection fails with ETIMEDOUT, or at once with a reset
from a peer that forgot it. A server that is merely slow still acknowledges
both, and is waited for.
"""

from __future__ import annotations

import asyncio
import socket

KEEPALIVE_PROBES = 3  # probes of an idle connection before it is given up


def dead_after(transport: asyncio.BaseTransport, seconds: float) -> None:
    """Have the kernel give up ``transport``'s TCP connection once nothing has come from
    the peer's host for about ``seconds`` (between ``seconds`` and a third more). A
    unix socket is left as it is; options this system lacks are left out
    (TCP_USER_TIMEOUT and TCP_KEEPIDLE are Linux's)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    probe_s = max(1, int(seconds / KEEPALIVE_PROBES))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", probe_s),
        ("TCP_KEEPINTVL", probe_s),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", int(seconds * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
