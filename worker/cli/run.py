"""``fnq worker``: the one command that loads the worker's runtime (agent, docker driver)."""

from __future__ import annotations

import logging

import click

from worker.cli._common import friendly_errors, run_async, settings_from
from worker.logs import setup_logging
from worker.runtime import raise_open_files_limit, serve, setup_sentry

log = logging.getLogger("fnq.worker")


@click.command("worker")
@click.option(
    "--burst",
    is_flag=True,
    help="Exit once no call is ready to run (for batch jobs, tests): delayed calls and "
    "retries waiting for their backoff stay queued. Status 1 if the queue cannot be reached.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="Calls held reserved but not yet running in a container.",
)
@click.pass_context
@friendly_errors
def worker_cmd(ctx: click.Context, burst: bool, prefetch: int) -> None:
    """Run calls from the queue in hot containers until SIGTERM/SIGINT."""
    settings = settings_from(ctx)
    setup_logging(settings)
    setup_sentry(settings)
    raised = raise_open_files_limit()
    if raised is not None:
        log.info("open files limit raised from %d to %d, the hard limit (ulimit -Hn): "
                 "a container takes about 10", *raised)  # fmt: skip
    run_async(serve(settings, burst=burst, prefetch=prefetch))
