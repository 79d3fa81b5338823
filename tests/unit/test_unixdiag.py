"""Whether a unix connection has been accepted, as the kernel's socket diagnostics tell."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.agent.unixdiag import peer_accepted, socket_inode


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory(prefix="fnq-diag-") as tmp:
        path = str(Path(tmp) / "l.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            sock.listen(4)
            yield sock, path


def test_a_connection_is_accepted_only_once_the_listener_takes_it(
    listener: tuple[socket.socket, str],
) -> None:
    server, path = listener
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)  # completes at once: the kernel queues it
        client.sendall(b"written before it was accepted")
        inode = socket_inode(client.fileno())
        assert peer_accepted(inode) is False
        taken, _ = server.accept()
        with taken:
            assert peer_accepted(inode) is True


def test_the_kernel_cannot_tell_of_an_unconnected_or_unknown_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as alone:
        assert peer_accepted(socket_inode(alone.fileno())) is None
    assert peer_accepted(0) is None
