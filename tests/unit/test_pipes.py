"""A container's output pipes, read on the host (drivers.pipes), with a shell as the container."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from worker.agent.drivers.pipes import NAMES, OutputPipes, make_pipes, wrapped_command


def test_the_wrapper_execs_the_command_with_its_output_on_the_pipes() -> None:
    argv = wrapped_command(["/usr/bin/python3", "-c", "print('$HOME')"])
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[2] == 'exec "$@" >/tmp/iofs/.fnq-stdout 2>/tmp/iofs/.fnq-stderr'
    assert argv[4:] == ["/usr/bin/python3", "-c", "print('$HOME')"]  # passed on untouched


def test_pipes_are_named_pipes_anyone_may_write(tmp_path: Path) -> None:
    make_pipes(tmp_path)
    for name in NAMES.values():
        mode = (tmp_path / name).stat().st_mode
        assert stat.S_ISFIFO(mode)
        assert stat.S_IMODE(mode) == 0o666


async def test_what_was_written_before_a_drain_is_all_read_by_it(tmp_path: Path) -> None:
    make_pipes(tmp_path)
    got: list[tuple[int, bytes]] = []
    pipes = OutputPipes(tmp_path, lambda stream, data: got.append((stream, data)))
    pipes.start()
    try:
        # The shell's redirections, as the container runs them, on this host's /bin/sh.
        script = wrapped_command([])[2].replace("/tmp/iofs", str(tmp_path))
        code = "import sys; print('out ' * 30000); print('err', file=sys.stderr)"
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", script, "x", sys.executable, "-c", code
        )
        # 180 kB: more than a pipe holds, so the loop reads while the process writes.
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        pipes.drain()
        out = b"".join(d for s, d in got if s == 1)
        err = b"".join(d for s, d in got if s == 2)
        assert out == b"out " * 30000 + b"\n"
        assert err == b"err\n"
        assert pipes.open  # the writer's exit is no end: the driver decides that
        got.clear()
        pipes.drain()
        assert got == []
    finally:
        pipes.close()
    assert not pipes.open


async def test_reading_waits_for_a_writer_that_has_not_come_yet(tmp_path: Path) -> None:
    make_pipes(tmp_path)
    got: list[bytes] = []
    pipes = OutputPipes(tmp_path, lambda _s, data: got.append(data))
    pipes.start()
    try:
        pipes.drain()  # no writer yet: nothing, and no end either
        await asyncio.sleep(0.01)  # the loop does not spin on a pipe without writers
        assert got == [] and pipes.open
        fd = os.open(tmp_path / NAMES[2], os.O_WRONLY)
        os.write(fd, b"late\n")
        os.close(fd)
        await asyncio.sleep(0.05)  # read by the loop, as it arrives
        assert got == [b"late\n"]
    finally:
        pipes.close()


async def test_close_takes_what_is_left(tmp_path: Path) -> None:
    make_pipes(tmp_path)
    got: list[bytes] = []
    pipes = OutputPipes(tmp_path, lambda _s, data: got.append(data))
    pipes.start()
    fd = os.open(tmp_path / NAMES[1], os.O_WRONLY)
    os.write(fd, b"last words\n")
    os.close(fd)
    pipes.close()
    assert got == [b"last words\n"]


async def test_something_else_than_a_pipe_is_refused(tmp_path: Path) -> None:
    (tmp_path / NAMES[1]).write_bytes(b"")
    os.mkfifo(tmp_path / NAMES[2])
    pipes = OutputPipes(tmp_path, lambda _s, _d: None)
    with pytest.raises(OSError, match="not a named pipe"):
        pipes.start()
    assert not pipes.open


def test_the_wrapper_runs_on_this_hosts_shell(tmp_path: Path) -> None:
    # The script itself, with the container's paths swapped for a temporary one.
    script = wrapped_command([])[2].replace("/tmp/iofs", str(tmp_path))
    out, err = tmp_path / NAMES[1], tmp_path / NAMES[2]
    subprocess.run(["/bin/sh", "-c", script, "x", "sh", "-c", "echo o; echo e >&2"], check=True)
    assert out.read_text() == "o\n" and err.read_text() == "e\n"
