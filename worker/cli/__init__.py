"""The ``fnq`` command line: parse, build settings once, run."""

from __future__ import annotations

import click

from config.errors import FnqError
from config.settings import load_settings
from worker.cli._common import fail
from worker.cli.config_cmd import config_cmd
from worker.cli.images import images_cmd
from worker.cli.queue import call_cmd, dead_group
from worker.cli.run import status_cmd, worker_cmd
from worker.cli.store import calls_group, fn_group, logs_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fnq")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """fnq: asynchronous function calls in hot Docker containers."""
    try:
        ctx.obj = load_settings()
    except FnqError as exc:
        fail(str(exc))


cli.add_command(config_cmd)
cli.add_command(fn_group)
cli.add_command(calls_group)
cli.add_command(logs_cmd)
cli.add_command(images_cmd)
cli.add_command(call_cmd)
cli.add_command(dead_group)
cli.add_command(worker_cmd)
cli.add_command(status_cmd)


def main() -> None:
    cli(prog_name="fnq")
