"""What the commands that read or queue load: the queue and the datastore, never the
worker's runtime (the agent, the docker client, aiohttp), which only ``fnq worker``
and ``fnq images`` use. Each command runs in a fresh interpreter, against the
embedded stores in tmp_path, and reports the modules it had loaded when it ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from config.domain import Call, CallStatus, Outcome, Response, new_call_id
from tests.datastore.test_cli import fnq, record
from worker.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[2]

# Packages (and their submodules) of the worker's runtime and of what only it uses.
RUNTIME = ("docker", "aiohttp", "requests", "sentry_sdk", "worker.agent", "worker.runtime",
           "worker.loop", "worker.calls", "worker.upkeep", "worker.images")  # fmt: skip

PROBE = """
import json, sys
out, args = sys.argv[1], json.loads(sys.argv[2])
sys.argv = ["fnq", *args]
code = "returned"
from worker.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


def run_fresh(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run ``fnq ARGS`` in a new interpreter on this tree; its exit code and modules."""
    out = tmp_path / "probe.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.exists(), done.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["code"] == 0, done.stderr
    return report


def runtime_loaded(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in RUNTIME)]


@pytest.fixture
def calls(stores_env: Path) -> Path:
    """A function, a call that succeeded (with a log) and one still queued."""
    assert fnq("fn", "create", "shop", "resize", "--image", "shop/resize:1").exit_code == 0
    ok = Call("01ABCDEFGHJKMNPQRSTVWXYZ00", "shop", "resize")
    waiting = Call(new_call_id(), "shop", "resize")
    outcome = Outcome(CallStatus.SUCCESS, response=Response(200, {}, b"resized"), log=b"3 ms\n")
    record([(ok, outcome), (waiting, None)])
    return stores_env


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["calls", "list"],
        ["calls", "show", "01ABCDEFGHJKMNPQRSTVWXYZ00"],
        ["calls", "wait", "01ABCDEFGHJKMNPQRSTVWXYZ00"],
        ["logs", "01ABCDEFGHJKMNPQRSTVWXYZ00"],
        ["fn", "list"],
        ["fn", "show", "shop", "resize"],
        ["dead", "list"],
        ["call", "shop", "resize", "--body", "x"],
    ],
    ids=" ".join,
)
def test_a_command_that_reads_or_queues_loads_no_runtime(calls: Path, args: list[str]) -> None:
    modules = run_fresh(calls, *args)["modules"]
    assert "datastore.sqlite" in modules or "mq.sqlite" in modules  # it did read the stores
    assert runtime_loaded(modules) == []


def test_help_loads_no_subcommand(settings_env: Path) -> None:
    modules = run_fresh(settings_env, "--help")["modules"]
    assert [m for m in modules if m.startswith("worker.cli.")] == ["worker.cli._common"]
    assert runtime_loaded(modules) == []
    assert "config.settings" not in modules  # no settings are read to print the help


def test_the_help_lists_each_command_as_its_own_help_would() -> None:
    """``fnq --help`` shows COMMANDS' summaries: they are the commands' own first
    paragraphs, shortened to any width as click shortens those."""
    ctx = click.Context(cli)
    for name, entry in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None
        for limit in (20, 45, 68, 200):
            placeholder = click.Command(name, help=entry.summary)
            assert placeholder.get_short_help_str(limit) == command.get_short_help_str(limit)
