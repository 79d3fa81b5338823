"""Real engines for tests: redis-server, PostgreSQL and the docker engine.

Each server is started on a free loopback port inside a temporary directory
and stopped at the end. When an engine is missing, integration tests skip on
a developer machine and fail under CI=true (a run that tests nothing is a
defect).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    """Skip locally, fail under CI."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: integration tests may not skip)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


UNIX_PATH_MAX = 104  # a unix socket's path, at most (sun_path, less room to spare)


@contextlib.asynccontextmanager
async def impostor(answer: bytes | None) -> AsyncIterator[int]:
    """A port on 127.0.0.1 where another service listens: it sends ``answer`` to
    whatever it is sent (an HTTP server, say), or never answers (None)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            if answer is None:
                await reader.read()  # until the client gives up
            else:
                await reader.read(1)
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@dataclass
class RedisServer:
    """A redis-server on a loopback port; ``restart()`` keeps its data directory.

    ``bind``: the addresses it listens on (loopback unless told; ``url`` stays on
    127.0.0.1, so keep it in the list). Bound elsewhere too, it serves clients from
    there without a password (protected mode off).
    """

    directory: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = False
    proc: subprocess.Popen[bytes] | None = None
    bind: tuple[str, ...] = ("127.0.0.1",)
    extra: tuple[str, ...] = ()  # more server options, say ("--requirepass", "pw")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        """Its unix socket (it listens there too, when the path is short enough)."""
        return self.directory / "redis.sock"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server is not installed")
        args = [
            str(exe),
            "--port",
            str(self.port),
            "--bind",
            *self.bind,
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        if len(str(self.socket)) < UNIX_PATH_MAX:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        if any(not addr.startswith("127.") for addr in self.bind):
            args += ["--protected-mode", "no"]  # else only loopback clients are served
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class PostgresServer:
    """A PostgreSQL on a loopback port (``bind``: its listen addresses; ``url`` stays on
    127.0.0.1, so keep it in the list). initdb trusts local and loopback connections."""

    directory: Path
    port: int = field(default_factory=free_port)
    user: str = "fnq"
    bind: tuple[str, ...] = ("127.0.0.1",)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode:  # with its own words: the exception alone would hide them
            raise subprocess.CalledProcessError(
                done.returncode, cmd, stderr=done.stderr
            ) from RuntimeError(done.stderr.decode(errors="replace")[-2000:])

    def start(self) -> PostgresServer:
        initdb = PG_BIN / "initdb"
        if not initdb.exists():
            missing("PostgreSQL is not installed (/usr/lib/postgresql/15/bin/initdb)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        data = self.directory / "data"
        self._run(str(initdb), "-D", str(data), "-A", "trust", "-U", self.user, "--no-sync")
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server on its existing data directory (after ``stop``)."""
        data = self.directory / "data"
        opts = (
            f"-p {self.port} -k {self.directory} -c listen_addresses={','.join(self.bind)} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-w",
            "-l",
            str(self.directory / "pg.log"),
            "start",
        )
        wait_port(self.port)
        return self

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: its sessions are ended, then it starts again."""
        data = str(self.directory / "data")
        self._run(str(PG_BIN / "pg_ctl"), "-D", data, "-m", "fast", "-w", "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            )


def docker_client() -> Iterator[object]:
    """A docker client that answers ping, or a skip/fail saying why not."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # any failure means "no engine"
        missing(f"no docker engine answers: {exc}")
    yield client
    client.close()


def pg_tempdir(tmp: Path) -> Path:
    """A directory for a PostgreSQL server that the postgres user can reach: beside
    pytest's own (any pytest run that starts makes ``pytest-of-USER`` owner-only again),
    named after ``tmp`` and removed when this process ends."""
    path = Path(tempfile.mkdtemp(prefix=f"fnq-pg-{tmp.name[:40]}-"))
    path.chmod(0o711)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path / "pg"


@contextlib.contextmanager
def small_tmpfs(directory: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``directory`` (made if missing) with mount ``options``
    (``size=1m``, ``nr_inodes=64``): a small file system for a test to fill up,
    unmounted at the end. Mounting needs root: skips as a user, fails under CI."""
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=False, timeout=30)


@contextlib.contextmanager
def small_socket_fs() -> Iterator[Path]:
    """A small tmpfs (1 MB, 64 inodes) at a short path under /tmp, for FN_IOFS_PATH:
    socket paths must fit in 107 bytes, so not under pytest's long tmp_path."""
    top = Path(tempfile.mkdtemp(prefix="fnq-t-"))
    try:
        with small_tmpfs(top / "io", "size=1m,nr_inodes=64,mode=700") as path:
            yield path
    finally:
        shutil.rmtree(top, ignore_errors=True)


def long_directory(top: Path, length: int) -> Path:
    """A path under ``top`` of ``length`` characters (in names of 200 at most), for a
    directory near the system's limit on paths (PATH_MAX, 4,096 bytes)."""
    left = length - len(str(top))  # in k names of n characters, each after a "/"
    k = -(-left // 201)
    total = left - k
    path = top.joinpath(*("d" * (total // k + (i < total % k)) for i in range(k)))
    assert len(str(path)) == length, path
    return path


def fill_space(directory: Path) -> Path:
    """Take every block left on ``directory``'s file system with one file; its path
    (remove it to give the space back)."""
    filler = directory / "fnq-test-filler"
    chunk = b"\0" * 4096
    with open(filler, "ab", buffering=0) as out, contextlib.suppress(OSError):  # ENOSPC
        while True:
            out.write(chunk)
    return filler


def fill_inodes(directory: Path, keep: int = 0) -> list[Path]:
    """Take the inodes left on ``directory``'s file system but ``keep`` of them, with
    empty files; their paths (remove them to give the inodes back)."""
    made: list[Path] = []
    with contextlib.suppress(OSError):  # ENOSPC: no inode left
        while True:
            path = directory / f"fnq-test-inode-{len(made)}"
            path.touch()
            made.append(path)
    for _ in range(min(keep, len(made))):
        made.pop().unlink()
    return made


def remount(mount_point: Path, mode: str) -> None:
    """Remount the file system mounted on ``mount_point`` read-only (``ro``) or
    read-write again (``rw``), as the kernel does to a disk after errors."""
    subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(mount_point)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
