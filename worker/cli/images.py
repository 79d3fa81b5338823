"""``fnq images build``: the offline function images."""

from __future__ import annotations

import os
from pathlib import Path

import click
import docker.errors

from worker.cli._common import fail, friendly_errors, json_option, print_json, print_table
from worker.images import ImageBuilder, find_functions

_DEFAULT_DIRS = ("scripts/functions", "tests/functions")


@click.group("images")
def images_cmd() -> None:
    """Function images built without a registry."""


@images_cmd.command("build")
@click.argument("dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild function images even when up to date.")
@json_option
@friendly_errors
def build_cmd(dirs: tuple[Path, ...], force: bool, as_json: bool) -> None:
    """Build the base image and fnq/<name>:latest for each function directory.

    A DIR holding func.py is one function; any other DIR is a folder of them.
    Without DIR: scripts/functions and tests/functions under the current
    directory. A requirements.txt next to func.py is installed into the image
    with the host's pip. Up-to-date images are skipped.
    """
    paths = list(dirs) or [Path(d) for d in _DEFAULT_DIRS if Path(d).is_dir()]
    if not paths:
        fail("no function directories given and none found under " + ", ".join(_DEFAULT_DIRS))
    functions = find_functions(paths)
    say = (lambda _msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    try:
        with ImageBuilder(progress=say) as builder:
            results = builder.build(functions, force=force)
    except docker.errors.DockerException as exc:
        fail(_docker_failure(exc))
        return
    if as_json:
        print_json([{"image": r.image, "built": r.built, "seconds": r.seconds} for r in results])
        return
    rows = [(r.image, "built" if r.built else "up to date", f"{r.seconds:.1f}s") for r in results]
    print_table(["IMAGE", "STATUS", "TIME"], rows)


def _docker_failure(exc: docker.errors.DockerException) -> str:
    """One line for a failure of the engine: where it was looked for and why it did
    not answer, when it could not be reached; the engine's own words otherwise."""
    link: BaseException | None = exc
    cause: OSError | None = None  # the innermost: the system's own reason
    while link is not None:
        if isinstance(link, OSError):
            cause = link
        link = link.__cause__ or link.__context__
    if cause is None:
        return f"docker: {exc}"
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    why = cause.strerror or str(cause) or type(cause).__name__
    return f"docker engine at {where} cannot be reached: {why} (is dockerd running? DOCKER_HOST?)"
