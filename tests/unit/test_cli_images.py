"""``fnq images build`` when the engine cannot be reached: one line that says where and why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import cli

ECHO = Path(__file__).resolve().parents[1] / "functions" / "echo"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["missing socket", "refused port"])
def test_an_unreachable_engine_is_named_with_the_reason(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "missing socket":
        host, reason = f"unix://{tmp_path}/no-docker.sock", "No such file or directory"
    else:
        host, reason = f"tcp://127.0.0.1:{closed_port()}", "Connection refused"
    monkeypatch.setenv("DOCKER_HOST", host)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    result = CliRunner().invoke(cli, ["images", "build", str(ECHO)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"fnq: docker engine at {host} cannot be reached: {reason} "
        "(is dockerd running? DOCKER_HOST?)\n"
    )
