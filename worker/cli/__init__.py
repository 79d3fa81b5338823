"""The ``fnq`` command line: parse, build settings once, run.

Subcommands are imported only when used, so that ``fnq call`` does not pay for
the docker client and ``fnq worker`` does not pay for what it never runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import click

from config.errors import FnqError
from worker.cli._common import fail, quiet_when_stdout_closes


class Entry(NamedTuple):
    """Where a subcommand is defined, and the first paragraph of its help, which
    ``fnq --help`` lists without importing the subcommand."""

    module: str
    attr: str
    summary: str


COMMANDS: dict[str, Entry] = {
    "worker": Entry("worker.cli.run", "worker_cmd",
                    "Run calls from the queue in hot containers until SIGTERM/SIGINT."),
    "call": Entry("worker.cli.queue", "call_cmd",
                  "Queue an asynchronous call of APP's function FN; prints the call id."),
    "calls": Entry("worker.cli.store", "calls_group",
                   "Inspect, cancel, retry and purge call records."),
    "logs": Entry("worker.cli.store", "logs_cmd", "Print the log (stdout and stderr) of a call; "
                  "it appears when the call ends."),
    "fn": Entry("worker.cli.fns", "fn_group", "Register, change, list and remove functions."),
    "dead": Entry("worker.cli.queue", "dead_group",
                  "Messages that will not be delivered again: list, requeue or purge them."),
    "status": Entry("worker.cli.status", "status_cmd", "Queue depth by state (and the RQ "
                    "queues'), calls by status and the live workers."),
    "images": Entry("worker.cli.images", "images_cmd", "Function images built without a registry."),
    "config": Entry("worker.cli.config_cmd", "config_cmd",
                    "Show the effective settings (environment, .env and defaults)."),
}  # fmt: skip


# click >= 8.2 reports a group run without a subcommand as a usage error whose message is the
# help text; that one is shown as click shows it.
_HELP_ERROR: Any = getattr(click.exceptions, "NoArgsIsHelpError", None)


def not_utf8(args: Sequence[str] | None) -> str | None:
    """The first argument that is not UTF-8, shown as its bytes, or None.

    Python keeps such bytes as lone surrogates, which no datastore can store and
    no query can carry: refused here, they fail alike on every backend. Bytes may
    be what ``--body`` (TEXT or @FILE) and ``fnq images`` (paths) are given.
    """
    args = list(args or ())
    if args[:1] == ["images"]:
        return None
    for i, arg in enumerate(args):
        if (i > 0 and args[i - 1] == "--body") or arg.startswith("--body="):
            continue
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return repr(arg.encode("utf-8", "surrogateescape"))[1:]
    return None


class LazyGroup(click.Group):
    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run as click's standalone mode does, with errors as one line ``fnq: ...`` on stderr.

        The exit status is click's: 2 for a usage error, 1 for any other.
        """
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        given = args[0] if args else kwargs.get("args")
        bad = not_utf8(sys.argv[1:] if given is None else given)
        if bad is not None:
            fail(f"{bad} is not UTF-8 text", 2)
        try:
            status = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as exc:
            if _HELP_ERROR is not None and isinstance(exc, _HELP_ERROR):
                exc.show()
                sys.exit(exc.exit_code)
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted")
        sys.exit(status if isinstance(status, int) else 0)  # an int only from ctx.exit(code)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(where.module), where.attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands as click lists them, shortened alike, from COMMANDS: ``fnq
        --help`` loads none of them (``fnq images`` would load the docker client)."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, click.Command(name, help=entry.summary).get_short_help_str(limit))
                for name, entry in COMMANDS.items()]  # fmt: skip
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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
    from config.settings import load_settings  # noqa: PLC0415 - not for --help

    try:
        ctx.obj = load_settings()
    except FnqError as exc:
        fail(str(exc))


def main() -> None:
    cli(prog_name="fnq")
