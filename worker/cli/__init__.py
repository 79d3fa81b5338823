"""The ``fnq`` command line: parse, build settings once, run.

Subcommands are imported only when used, so that ``fnq call`` does not pay for
the docker client and ``fnq worker`` does not pay for what it never runs.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from config.errors import FnqError
from config.settings import load_settings
from worker.cli._common import fail, quiet_when_stdout_closes

COMMANDS: dict[str, tuple[str, str]] = {
    "worker": ("worker.cli.run", "worker_cmd"),
    "call": ("worker.cli.queue", "call_cmd"),
    "calls": ("worker.cli.store", "calls_group"),
    "logs": ("worker.cli.store", "logs_cmd"),
    "fn": ("worker.cli.store", "fn_group"),
    "dead": ("worker.cli.queue", "dead_group"),
    "status": ("worker.cli.run", "status_cmd"),
    "images": ("worker.cli.images", "images_cmd"),
    "config": ("worker.cli.config_cmd", "config_cmd"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(where[0]), where[1])
        assert isinstance(command, click.Command)
        return command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with quiet_when_stdout_closes():  # --help, --version
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with quiet_when_stdout_closes():
            return super().invoke(ctx)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fnq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """fnq: asynchronous function calls in hot Docker containers."""
    try:
        ctx.obj = load_settings()
    except FnqError as exc:
        fail(str(exc))


def main() -> None:
    cli(prog_name="fnq")
