"""Network namespaces as stand-in hosts: one veth link each to the host namespace.

:func:`links` creates ``count`` namespaces ``fnqb-<token>-<i>``, each joined to
the host by a veth pair ``fqb<token>h<i>`` (host side) / ``fqb<token>n<i>``
(inside; another ``tag`` than ``b`` replaces the ``b`` in these names) on its
own /30 of a randomly chosen ``10.231.X.0/24`` not in use on this host: host side
``10.231.X.(4i+1)``, namespace side ``10.231.X.(4i+2)``, loopback up in the
namespace. Run a process "on host i" with
``(*link.exec_prefix, cmd...)``; it reaches a server of the host namespace at
``link.host_addr``, through the veth. Everything is removed on the way out,
whatever the exit (exception, Ctrl-C).

Needs root and iproute2; :func:`unusable` says why not, before anything is made.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

NET = "10.231"
TIMEOUT_S = 30.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


@dataclass(frozen=True)
class Link:
    ns: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)


def _ip(*args: str) -> str:
    try:
        out = subprocess.run(
            ["ip", *args], capture_output=True, text=True, check=False, timeout=TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
    if out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def unusable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2 is not installed)"
    if os.geteuid() != 0:
        return "not root (`ip netns add` needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    try:
        _ip("netns", "list")
    except NetnsError as exc:
        return str(exc)
    return None


def _free_subnet() -> str:
    """``10.231.X`` with X not seen in this host's addresses or routes."""
    used = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show", "table", "all")
    for _ in range(50):
        net = f"{NET}.{random.randint(1, 254)}"
        if f"{net}." not in used:
            return net
    raise NetnsError(f"no free {NET}.X.0/24 found")


def _create(link: Link) -> None:
    _ip("netns", "add", link.ns)
    _ip("link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if, "netns", link.ns)
    _ip("addr", "add", f"{link.host_addr}/30", "dev", link.host_if)
    _ip("link", "set", link.host_if, "up")
    _ip("-n", link.ns, "addr", "add", f"{link.ns_addr}/30", "dev", link.ns_if)
    _ip("-n", link.ns, "link", "set", link.ns_if, "up")
    _ip("-n", link.ns, "link", "set", "lo", "up")


def _destroy(link: Link) -> None:
    """Remove the namespace (its veth end goes with it, and so the peer) and, in case
    that failed half way, the host side; errors are ignored."""
    for args in (("netns", "del", link.ns), ("link", "del", link.host_if)):
        with contextlib.suppress(NetnsError):
            _ip(*args)


def leftovers(made: list[Link]) -> list[str]:
    """Namespaces and host-side links of ``made`` still present (none after :func:`links`)."""
    present = set(_ip("netns", "list").split())
    for line in _ip("-o", "link", "show").splitlines():
        fields = line.split()
        if len(fields) > 1:
            present.add(fields[1].rstrip(":").split("@")[0])
    return [name for link in made for name in (link.ns, link.host_if) if name in present]


@contextlib.contextmanager
def links(count: int, tag: str = "b") -> Iterator[list[Link]]:
    """``count`` namespaces linked to the host namespace; removed on exit. ``tag``
    (one letter) tells these names from those of other users of this module."""
    token = secrets.token_hex(3)
    net = _free_subnet()
    wanted = [
        Link(
            ns=f"fnq{tag}-{token}-{i}",
            host_if=f"fq{tag}{token}h{i}",
            ns_if=f"fq{tag}{token}n{i}",
            host_addr=f"{net}.{4 * i + 1}",
            ns_addr=f"{net}.{4 * i + 2}",
        )
        for i in range(count)
    ]
    made: list[Link] = []
    try:
        for link in wanted:
            made.append(link)  # before creating: a half-made link is removed too
            _create(link)
        yield wanted
    finally:
        for link in made:
            _destroy(link)


def traffic_bytes(made: list[Link]) -> int:
    """Bytes received plus sent so far by the host sides of ``made``."""
    total = 0
    for link in made:
        stats = f"/sys/class/net/{link.host_if}/statistics"
        for name in ("rx_bytes", "tx_bytes"):
            with open(f"{stats}/{name}") as f:
                total += int(f.read())
    return total
