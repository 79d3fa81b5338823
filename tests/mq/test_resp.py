"""The queue's lean Redis connections (mq.resp) on a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from config.domain import Call, new_call_id
from config.settings import load_settings
from mq.base import QueueStats, open_queue
from mq.errors import QueueUnavailable
from mq.resp import Lines, ReplyError, pack
from tests.rig import RedisServer, free_port, missing

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.stop()


def lines_to(port: int, **kwargs: object) -> Lines:
    return Lines({"host": "127.0.0.1", "port": port, **kwargs}, tls=False, connect_timeout_s=5.0)


def cli(port: int, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True,
                          text=True, check=True, timeout=10)  # fmt: skip
    return done.stdout.strip()


async def test_pipelined_replies_come_back_in_order_with_errors_in_place(
    server: RedisServer,
) -> None:
    lines = lines_to(server.port)
    try:
        replies = await lines.call(
            pack("SET", "k", "text") + pack("INCR", "k") + pack("GET", "k"), 3
        )
        assert replies[0] == b"OK"
        assert isinstance(replies[1], ReplyError) and "not an integer" in str(replies[1])
        assert replies[2] == b"text"
        assert await lines.call(pack("PING")) == [b"PONG"]  # the same connection, in step
    finally:
        lines.close()


async def test_the_first_reply_is_told_before_the_rest_comes(server: RedisServer) -> None:
    lines = lines_to(server.port)
    loop = asyncio.get_running_loop()
    told: list[tuple[object, float]] = []
    try:
        t0 = loop.time()
        replies = await lines.call(
            pack("PING") + pack("BLPOP", "nothing", "0.3"), 2,
            lambda first: told.append((first, loop.time() - t0)),
        )  # fmt: skip
        done_s = loop.time() - t0
        assert replies == [b"PONG", None]
        assert told[0][0] == b"PONG"
        assert told[0][1] < 0.2 <= done_s  # told while the blocking pop still waited
    finally:
        lines.close()


async def test_a_connection_whose_caller_gave_up_is_not_reused(server: RedisServer) -> None:
    lines = lines_to(server.port)
    try:
        waiting = asyncio.create_task(lines.call(pack("BLPOP", "jobs", "5")))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.05)
        # Closed, its pop is over: a value pushed now stays in the list. On a connection
        # still open the abandoned pop would take it.
        assert cli(server.port, "RPUSH", "jobs", "one") == "1"
        assert await lines.call(pack("LLEN", "jobs")) == [1]
    finally:
        lines.close()


async def test_idle_connections_the_server_dropped_are_replaced(server: RedisServer) -> None:
    lines = lines_to(server.port)
    try:
        assert await lines.call(pack("SET", "n", "1")) == [b"OK"]
        assert int(cli(server.port, "CLIENT", "KILL", "TYPE", "normal")) >= 1
        assert await lines.call(pack("INCR", "n")) == [2]  # no error for the caller
    finally:
        lines.close()


async def test_a_server_that_stops_answering_fails_the_waiting_call(
    server: RedisServer,
) -> None:
    lines = lines_to(server.port)
    try:
        waiting = asyncio.create_task(lines.call(pack("BLPOP", "jobs", "5")))
        await asyncio.sleep(0.1)
        server.stop()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 5.0)
    finally:
        lines.close()


async def _round_trip(url: str, while_held: Callable[[Call], None] | None = None) -> None:
    """A call pushed, reserved (``while_held`` looks at it then) and acked over ``url``."""
    q = open_queue(url, load_settings())
    try:
        call = Call(new_call_id(), "demo", "echo", b"body " + url.encode())
        await q.push(call)
        [msg] = await q.reserve_many(2, 1.0)
        assert msg.call.id == call.id and msg.call.body == call.body
        if while_held is not None:
            while_held(call)
        await q.ack_many([msg])
        assert await q.stats() == QueueStats(0, 0, 0, 0)
    finally:
        await q.close()


async def _refused(url: str) -> None:
    q = open_queue(url, load_settings())
    try:
        with pytest.raises(QueueUnavailable):
            await q.reserve_many(1, 0.1)
    finally:
        await q.close()


async def test_password_and_database_of_the_url_are_used(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path, extra=("--requirepass", PASSWORD)).start()
    try:
        wrong = lines_to(srv.port, password="wrong")
        with pytest.raises(ConnectionError, match="refused"):
            await wrong.call(pack("PING"))
        wrong.close()
        for url in (
            f"redis://:{PASSWORD}@127.0.0.1:{srv.port}/5?prefix=pw",
            f"redis://default:{PASSWORD}@127.0.0.1:{srv.port}/5?prefix=user",
        ):
            prefix = url.rpartition("=")[2]

            def in_db5(call: Call, prefix: str = prefix) -> None:
                found = cli(srv.port, "-a", PASSWORD, "--no-auth-warning", "-n", "5",
                            "HEXISTS", f"{prefix}:ids", call.id)  # fmt: skip
                assert found == "1"

            await _round_trip(url, while_held=in_db5)
        await _refused(f"redis://:wrong@127.0.0.1:{srv.port}/0")
    finally:
        srv.stop()


def _certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem in ``folder``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl is not installed")
    subprocess.run(
        [str(openssl), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return folder / "cert.pem"


async def test_tls_urls_are_served_over_tls(tmp_path: Path) -> None:
    cert = _certificate(tmp_path)
    port = free_port()
    srv = RedisServer(tmp_path, port=port, extra=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(tmp_path / "key.pem"), "--tls-auth-clients", "no",
    )).start()  # fmt: skip
    try:
        await _round_trip(f"rediss://127.0.0.1:{port}/0?prefix=tls&ssl_ca_certs={cert}")
        await _refused(f"rediss://127.0.0.1:{port}/0?prefix=tls")  # nobody vouches for it
        plain = Lines({"host": "127.0.0.1", "port": port, "ssl_ca_certs": str(cert)},
                      tls=True, connect_timeout_s=5.0)  # fmt: skip
        no_ca = Lines({"host": "127.0.0.1", "port": port}, tls=True, connect_timeout_s=5.0)
        inline = Lines({"host": "127.0.0.1", "port": port, "ssl_ca_data": cert.read_text()},
                       tls=True, connect_timeout_s=5.0)  # fmt: skip
        try:
            assert await plain.call(pack("PING")) == [b"PONG"]
            assert await inline.call(pack("PING")) == [b"PONG"]
            with pytest.raises(ssl.SSLCertVerificationError):
                await no_ca.call(pack("PING"))
        finally:
            for lines in (plain, no_ca, inline):
                lines.close()
    finally:
        srv.stop()


async def test_a_tcp_connection_is_given_up_after_the_silence_it_is_told(
    server: RedisServer,
) -> None:
    """Keepalive probes while it waits, and the kernel's limit on unacknowledged
    data: a silent network ends even a blocking read (config.tcp; the network
    itself is cut in tests/network)."""
    lines = Lines(
        {"host": "127.0.0.1", "port": server.port}, tls=False, connect_timeout_s=5.0,
        dead_after_s=6.0,
    )  # fmt: skip
    try:
        assert await lines.call(pack("PING")) == [b"PONG"]
        [line] = lines._idle
        assert line._transport is not None
        sock = line._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 2
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
    finally:
        lines.close()


async def test_a_connection_that_is_never_accepted_says_where_and_how_long() -> None:
    """A server whose backlog is full drops new connections' SYNs in silence, as a
    silent network does: the error names the server and the time waited, not the
    time limit of the command that needed the connection."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(0)
        port = busy.getsockname()[1]
        queued = socket.create_connection(("127.0.0.1", port), timeout=2)  # fills it
        try:
            lines = Lines({"host": "127.0.0.1", "port": port}, tls=False, connect_timeout_s=0.5)
            with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port} within 0.5 s"):
                await lines.call(pack("PING"))
        finally:
            queued.close()
