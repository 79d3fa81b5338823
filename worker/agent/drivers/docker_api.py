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
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from config.domain import FailureKind
from config.errors import AgentError, ConfigError, Retryable

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


@dataclass(slots=True)
class AttachStream:
    """The hijacked connection of one attach request."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """(stream, payload) of the multiplexed stream until EOF; 1 = stdout, 2 = stderr."""
        while True:
            try:
                header = await self.reader.readexactly(8)
                size = int.from_bytes(header[4:8], "big")
                payload = await self.reader.readexactly(size) if size else b""
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if payload:
                yield header[0], payload

    def close(self) -> None:
        self.writer.close()


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

    async def attach(self, container_id: str, timeout_s: float = API_TIMEOUT_S) -> AttachStream:
        """Attach to stdout and stderr; returns once the engine has accepted the attach."""
        query = urlencode({"stream": "1", "stdout": "1", "stderr": "1"})
        request = (
            f"POST /containers/{container_id}/attach?{query} HTTP/1.1\r\n"
            "Host: docker\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=_HEADER_LIMIT_BYTES
                )
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    refusal = (
                        None if status in (101, 200) else await reader.read(_HEADER_LIMIT_BYTES)
                    )
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError:
            raise DockerTimeout(f"attach to {container_id} took more than {timeout_s}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise DockerError(f"attach to {container_id} failed: {exc}") from exc
        if refusal is not None:
            writer.close()
            raise DockerError(_message(refusal, status), status)
        return AttachStream(reader, writer)


def _message(raw: bytes, status: int) -> str:
    text = raw.decode("utf-8", "replace").strip()
    # A chunked body read raw starts with its chunk size; the JSON follows.
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(text[start : text.rfind("}") + 1]).get("message", text))
    return text or f"HTTP {status}"
