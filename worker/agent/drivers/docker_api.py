"""A small asynchronous client of the Docker Engine API over its unix socket.

Only what the driver needs: JSON requests with a timeout each, a streamed
pull, and the attach stream (a hijacked HTTP connection carrying the
container's multiplexed stdout and stderr). Paths are unversioned, so the
daemon answers with its own API version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import quote, urlencode

import aiohttp

from config.domain import FailureKind
from config.errors import AgentError, ConfigError, Retryable

log = logging.getLogger("fnq.agent.docker")

DEFAULT_SOCKET = "/var/run/docker.sock"
API_TIMEOUT_S = 30.0  # any single engine request without a more specific bound
_HEADER_LIMIT_BYTES = 64 * 1024


class DockerError(AgentError, Retryable):
    """The engine refused or failed a request; not the function's fault."""

    failure = FailureKind.BUSY

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DockerTimeout(DockerError):
    """A request ran past its timeout."""


def default_socket_path() -> str:
    """The engine socket named by DOCKER_HOST (docker's own variable), else the default."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://") :]
    raise ConfigError(
        f"DOCKER_HOST={host!r}: fnq talks to the docker engine over a unix socket only"
    )


def image_path(image: str) -> str:
    return quote(image, safe="/:@")


def split_reference(image: str) -> tuple[str, str]:
    """``repo[:tag]`` or ``repo@digest`` into what /images/create wants."""
    if "@" in image:
        return image, ""
    repo, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return repo, tag
    return image, "latest"


class AttachStream(asyncio.Protocol):
    """The hijacked connection of one attach request, read as it arrives.

    After the engine's answer to the attach request, the connection carries
    frames of an 8-byte header (stream, 3 zero bytes, big-endian size) and a
    payload. Each payload is handed to ``on_frame(stream, payload)`` (1 =
    stdout, 2 = stderr) from ``data_received`` itself, with no task in
    between: a call's end-of-output marker is seen the moment it arrives.
    ``ended`` resolves when the connection is gone.
    """

    def __init__(self, on_frame: Callable[[int, bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self.answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self.answer.done() and not self._read_answer():
            return
        buf = self._buf
        at = 0
        while len(buf) - at >= 8:
            size = int.from_bytes(buf[at + 4 : at + 8], "big")
            if len(buf) - at - 8 < size:
                break
            if size:
                try:
                    self._on_frame(buf[at], bytes(buf[at + 8 : at + 8 + size]))
                except Exception:  # the output must keep flowing: log, go on
                    log.exception("handling a frame of the attach stream failed")
            at += 8 + size
        if at:
            del buf[:at]

    def _read_answer(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _HEADER_LIMIT_BYTES:
                self.answer.set_exception(DockerError("attach: the engine's answer is too long"))
                self.close()
            return False
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.answer.set_exception(DockerError(f"attach: bad answer {head[:80]!r}"))
            self.close()
            return False
        self.answer.set_result((status, b"" if status in (101, 200) else bytes(self._buf)))
        return status in (101, 200)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                DockerError(f"attach: the engine closed the connection ({exc or 'EOF'})")
            )
        if not self.ended.done():
            self.ended.set_result(None)

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class DockerAPI:
    """One keep-alive session to the engine; every request carries its own timeout."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path or default_socket_path()
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            # limit=0: long waits (container wait) must not starve short requests.
            connector = aiohttp.UnixConnector(path=self.socket_path, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector, base_url="http://docker", auto_decompress=False
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise DockerError("the docker client is not open")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        timeout_s: float | None = API_TIMEOUT_S,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One request; returns the decoded JSON (or None). DockerError on >= 400.

        ``timeout_s=None`` is only for waits that last as long as a container
        and are cancelled by their owner.
        """
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self._sess().request(
                method,
                path,
                params=params,
                json=body,
                data=data,
                headers=headers,
                timeout=timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise DockerError(_message(raw, resp.status), resp.status)
                if not raw or not resp.content_type.endswith("json"):
                    return None
                return json.loads(raw)
        except TimeoutError:  # before OSError, of which it is a subclass
            raise DockerTimeout(f"docker {method} {path} took more than {timeout_s}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DockerError(f"docker engine at {self.socket_path}: {exc}") from exc

    async def stream_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str],
        timeout_s: float,
        data: Any = None,
    ) -> list[dict[str, Any]]:
        """A request answered by a stream of JSON objects (pull, load); raises on an error."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        events: list[dict[str, Any]] = []
        try:
            async with self._sess().request(
                method, path, params=params, data=data, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise DockerError(_message(await resp.read(), resp.status), resp.status)
                async for line in resp.content:
                    if line.strip():
                        events.append(json.loads(line))
        except TimeoutError:
            raise DockerTimeout(f"docker {method} {path} took more than {timeout_s}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DockerError(f"docker engine at {self.socket_path}: {exc}") from exc
        for event in events:
            if event.get("error"):
                raise DockerError(str(event["error"]).strip(), 500)
        return events

    async def attach(
        self,
        container_id: str,
        on_frame: Callable[[int, bytes], None],
        timeout_s: float = API_TIMEOUT_S,
    ) -> AttachStream:
        """Attach to stdout and stderr; returns once the engine has accepted the attach.

        From then on ``on_frame(stream, payload)`` gets the container's output.
        """
        query = urlencode({"stream": "1", "stdout": "1", "stderr": "1"})
        request = (
            f"POST /containers/{container_id}/attach?{query} HTTP/1.1\r\n"
            "Host: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        stream: AttachStream | None = None
        try:
            async with asyncio.timeout(timeout_s):
                _, stream = await loop.create_unix_connection(
                    lambda: AttachStream(on_frame), self.socket_path
                )
                stream.write(request)
                status, refusal = await stream.answer
        except TimeoutError:
            if stream is not None:
                stream.close()
            raise DockerTimeout(f"attach to {container_id} took more than {timeout_s}s") from None
        except (OSError, DockerError) as exc:
            if stream is not None:
                stream.close()
            raise DockerError(f"attach to {container_id} failed: {exc}") from exc
        if status not in (101, 200):
            stream.close()
            raise DockerError(_message(refusal, status), status)
        return stream


def _message(raw: bytes, status: int) -> str:
    text = raw.decode("utf-8", "replace").strip()
    # A chunked body read raw starts with its chunk size; the JSON follows.
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(text[start : text.rfind("}") + 1]).get("message", text))
    return text or f"HTTP {status}"
