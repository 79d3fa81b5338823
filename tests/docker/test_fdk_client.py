"""FdkClient against a hand-written HTTP server on a unix socket (no docker needed)."""

from __future__ import annotations

import asyncio
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tests.docker.conftest import request
from worker.agent.errors import (
    DispatchError,
    InvalidResponse,
    NotAccepted,
    NotDelivered,
    ResponseTooBig,
)
from worker.agent.fdk import FdkClient, request_headers, rfc3339
from worker.agent.iofs import check_listener, open_listener

Handler = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]
T = TypeVar("T")


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """Serve ``handler(head, body, writer)`` for each request; yields (path, heads seen)."""
    heads: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="fnq-fdk-") as tmp:
        path = str(Path(tmp) / "lsnr.sock")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    heads.append(head)
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    body = await reader.readexactly(length)
                    await handler(head, body, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_unix_server(serve, path)
        try:
            yield path, heads
        finally:
            srv.close()
            await srv.wait_closed()


def reply(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode() + extra + b"\r\n" + body
    )


async def echo(_head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(reply(200, body, b"Content-Type: text/plain\r\nConnection: keep-alive\r\n"))
    await writer.drain()


def test_headers_drop_hop_by_hop_and_add_fn_ones() -> None:
    req = request(
        b"",
        Connection="close",
        Keep_Alive="1",
        Transfer_Encoding="chunked",
        Upgrade="h2c",
        Proxy_Authorization="x",
        Content_Type="text/csv",
        X_Custom="kept",
    )
    out = request_headers(req)
    assert {k.lower() for k in out} == {"content-type", "x-custom", "fn-call-id", "fn-deadline"}
    assert out["Fn-Call-Id"] == req.call_id


def test_deadline_is_rfc3339_utc() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    assert rfc3339(moment) == "2030-01-02T03:04:05.678Z"


async def test_round_trip_and_keep_alive() -> None:
    async with server(echo) as (path, heads):
        client = FdkClient(path)
        try:
            for i in range(5):
                result = await client.call(request(f"body {i}".encode(), Content_Type="a/b"))
                assert result.status == 200 and result.body == f"body {i}".encode()
            assert "Connection" not in result.headers  # hop-by-hop dropped on the way back
            assert result.headers["Content-Type"] == "text/plain"
            assert client.connections_made == 1
        finally:
            await client.close()
    first = heads[0].decode()
    assert first.startswith("POST /call HTTP/1.1\r\n")
    assert "Fn-Call-Id: call-" in first and "Fn-Deadline: " in first
    assert "Content-Type: a/b" in first


async def test_body_over_the_limit_is_truncated() -> None:
    async def big(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(200, b"y" * 300_000))
        await writer.drain()

    async with server(big) as (path, _):
        client = FdkClient(path, max_response_bytes=1000)
        try:
            result = await client.call(request())
            again = await client.call(request())
        finally:
            await client.close()
    assert result.truncated and result.body == b"y" * 1000
    assert again.truncated  # a new connection served the second call


async def test_headers_over_the_limit() -> None:
    async def fat(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(200, b"ok", b"X-Fat: " + b"f" * 5000 + b"\r\n"))
        await writer.drain()

    async with server(fat) as (path, _):
        client = FdkClient(path, max_header_bytes=1024)
        try:
            with pytest.raises(ResponseTooBig):
                await client.call(request())
        finally:
            await client.close()


async def test_timeout_is_timeout_error() -> None:
    async def slow(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with server(slow) as (path, _):
        client = FdkClient(path)
        try:
            with pytest.raises(TimeoutError):
                await client.call(request(timeout_s=0.2))
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "the connection closed without a response"),
        (b"garbage\r\n\r\n", "malformed function response: bad status line b'garbage'"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "the connection closed before the response was complete",
        ),
    ],
    ids=["closed", "garbage", "short-body"],
)
async def test_broken_answers_are_dispatch_errors(answer: bytes, message: str) -> None:
    async def broken(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with server(broken) as (path, _):
        client = FdkClient(path)
        try:
            with pytest.raises(DispatchError) as caught:
                await client.call(request())
        finally:
            await client.close()
    # A connection that drops is not a malformed answer: the function may have died.
    assert isinstance(caught.value, InvalidResponse) == (answer.startswith(b"garbage"))
    # The agent puts "error receiving the function's response: " before it, once.
    assert str(caught.value) == message


async def test_no_listener_is_a_dispatch_error_that_sent_nothing() -> None:
    client = FdkClient(f"/tmp/fnq-missing-{secrets.token_hex(4)}.sock")
    delivered: list[int] = []
    try:
        with pytest.raises(NotDelivered, match="cannot connect to the function"):
            await client.call(request(), lambda: delivered.append(1))
    finally:
        await client.close()
    assert delivered == []  # the call never reached a function


async def test_a_call_is_delivered_once_the_socket_takes_its_connection() -> None:
    """New connection or kept-alive one, ``on_delivered`` comes once per call, before
    the function has read the request."""
    seen: list[str] = []

    async def note(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(f"read {body.decode()}")
        await echo(head, body, writer)

    async with server(note) as (path, _heads):
        client = FdkClient(path)
        try:
            for i in range(2):
                await client.call(request(f"{i}".encode()), lambda i=i: seen.append(f"sent {i}"))
            assert client.connections_made == 1
        finally:
            await client.close()
    assert seen == ["sent 0", "read 0", "sent 1", "read 1"]


async def test_chunked_answer() -> None:
    async def chunked(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await writer.drain()

    async with server(chunked) as (path, _):
        client = FdkClient(path)
        try:
            first = await client.call(request())
            second = await client.call(request())
        finally:
            await client.close()
    assert first.body == second.body == b"abcde"
    assert client.connections_made == 1


async def test_a_connection_the_function_closes_is_opened_again() -> None:
    async def once(_head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(200, body, b"Connection: close\r\n"))
        await writer.drain()
        writer.close()

    async def quietly(_head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(200, body))  # says keep-alive, then closes anyway
        await writer.drain()
        writer.close()

    for handler in (once, quietly):
        async with server(handler) as (path, _):
            client = FdkClient(path)
            try:
                for i in range(3):
                    result = await client.call(request(f"{i}".encode()))
                    assert result.body == f"{i}".encode()
                    await asyncio.sleep(0.05)  # let the close reach the client
            finally:
                await client.close()
        assert client.connections_made == 3


async def test_answer_without_length_ends_with_the_connection() -> None:
    async def until_close(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"this")
        await writer.drain()
        writer.close()

    async with server(until_close) as (path, _):
        client = FdkClient(path)
        try:
            result = await client.call(request())
        finally:
            await client.close()
    assert (result.status, result.body) == (200, b"all of this")


@asynccontextmanager
async def listener_dir() -> AsyncIterator[tuple[Path, list[str]]]:
    """A socket directory as the FDK makes it (``lsnr.sock`` a link to ``phony.sock``),
    and a socket outside it (``outside.sock`` next to it); yields (directory, the names
    of the sockets that took a connection, in order)."""
    reached: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fnq-fdk-") as tmp:
        directory = Path(tmp) / "iofs"
        directory.mkdir()
        servers = []
        for path in (directory / "phony.sock", Path(tmp) / "outside.sock"):

            async def serve(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str = path.name
            ) -> None:
                reached.append(name)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await echo(head, await reader.readexactly(length), writer)
                except (asyncio.IncompleteReadError, ConnectionError):
                    pass
                finally:
                    writer.close()

            servers.append(await asyncio.start_unix_server(serve, str(path)))
        (directory / "lsnr.sock").symlink_to("phony.sock")
        try:
            yield directory, reached
        finally:
            for srv in servers:
                srv.close()
                await srv.wait_closed()


async def test_the_checked_socket_is_the_one_connected_to() -> None:
    # The container owns the socket directory: it may relink lsnr.sock at any time.
    # Between the check and the connect, a link to a socket outside the directory
    # must not take the connection: the connect goes to the socket that was checked.
    async with listener_dir() as (directory, reached):
        outside = directory.parent / "outside.sock"

        def opener_then_swap() -> int:
            fd = open_listener(directory)
            (directory / "lsnr.sock").unlink()
            (directory / "lsnr.sock").symlink_to(outside)
            return fd

        client = FdkClient(str(directory / "lsnr.sock"), opener=opener_then_swap)
        try:
            assert (await client.call(request(b"one"))).body == b"one"
        finally:
            await client.close()
        assert reached == ["phony.sock"]
        # The next connection is checked again: the link out is refused, unsent.
        client = FdkClient(str(directory / "lsnr.sock"), opener=lambda: open_listener(directory))
        try:
            with pytest.raises(NotDelivered, match=r"symlink to .*outside\.sock"):
                await client.call(request(b"two"))
        finally:
            await client.close()
        assert reached == ["phony.sock"]


async def test_a_path_checked_then_connected_to_could_be_swapped() -> None:
    # Why the opener: without it the connect follows whatever the link says by then.
    async with listener_dir() as (directory, reached):
        check_listener(directory)
        (directory / "lsnr.sock").unlink()
        (directory / "lsnr.sock").symlink_to(directory.parent / "outside.sock")
        client = FdkClient(str(directory / "lsnr.sock"))
        try:
            await client.call(request(b"x"))
        finally:
            await client.close()
        assert reached == ["outside.sock"]


# The worker runs on uvloop; the tests' own loop is asyncio's. A unix connect to a full
# backlog goes differently on each (asyncio takes it for connected, uvloop fails it).
LOOPS = ["asyncio", "uvloop"]
CLOCK_STEP_S = 0.001  # uvloop's loop time counts whole milliseconds


def run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)


@contextmanager
def idle_listener(backlog: int) -> Iterator[tuple[socket.socket, str]]:
    """A listening socket nobody accepts on (a function that is stuck, or never accepts)."""
    with tempfile.TemporaryDirectory(prefix="fnq-fdk-") as tmp:
        path = str(Path(tmp) / "lsnr.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            sock.listen(backlog)
            yield sock, path


def fill_backlog(path: str) -> list[socket.socket]:
    """Connections to ``path`` until its listener's backlog has no room left."""
    held: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return held
        held.append(sock)


async def call_timed(path: str, timeout_s: float) -> tuple[BaseException | None, list[int], float]:
    """(what the call raised, its deliveries, how long it took)."""
    client = FdkClient(path)
    delivered: list[int] = []
    started = time.monotonic()
    try:
        await client.call(request(timeout_s=timeout_s), lambda: delivered.append(1))
    except Exception as exc:  # the test looks at it
        return exc, delivered, time.monotonic() - started
    finally:
        await client.close()
    return None, delivered, time.monotonic() - started


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_left_in_the_backlog_until_the_timeout_was_not_accepted(loop: str) -> None:
    # The kernel completes the connect into the backlog (the call counts as delivered
    # then); at the timeout the function has still not accepted it: it never got the
    # call, which is no timeout of its run.
    with idle_listener(backlog=4) as (_, path):
        error, delivered, took = run_on(loop, call_timed(path, timeout_s=0.3))
    assert isinstance(error, NotAccepted), repr(error)
    assert str(error) == "the connection waited in the function's listener backlog"
    assert delivered == [1]
    assert 0.3 - CLOCK_STEP_S <= took < 1.0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_backlog_that_stays_full_until_the_timeout_takes_no_connection(loop: str) -> None:
    with idle_listener(backlog=0) as (_, path):
        held = fill_backlog(path)
        try:
            error, delivered, took = run_on(loop, call_timed(path, timeout_s=0.3))
        finally:
            for sock in held:
                sock.close()
    assert isinstance(error, NotAccepted), repr(error)
    assert str(error) == "the function's listener backlog stayed full"
    assert delivered == []  # no connection: nothing was sent
    assert 0.3 - CLOCK_STEP_S <= took < 1.0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_full_backlog_that_makes_room_in_time_takes_the_call(loop: str) -> None:
    async def serve_all(listening: socket.socket) -> asyncio.Server:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r")[0]))
                writer.write(reply(200, b"served"))
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # one of the connections that filled the backlog
            finally:
                writer.close()

        return await asyncio.start_unix_server(answer, sock=listening)

    async def go(listening: socket.socket, path: str) -> bytes:
        loop_ = asyncio.get_running_loop()
        opened: list[asyncio.Task[asyncio.Server]] = []
        # The function starts accepting 0.1 s into the call: the backlog makes room.
        loop_.call_later(0.1, lambda: opened.append(loop_.create_task(serve_all(listening))))
        client = FdkClient(path)
        try:
            return (await client.call(request(b"x", timeout_s=5.0))).body
        finally:
            await client.close()
            for task in opened:
                (await task).close()

    with idle_listener(backlog=0) as (listening, path):
        held = fill_backlog(path)
        try:
            assert run_on(loop, go(listening, path)) == b"served"
        finally:
            for sock in held:
                sock.close()
