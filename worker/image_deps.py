"""A function's own Python packages: ``requirements.txt`` next to ``func.py``.

When a function directory holds ``requirements.txt``, its image build installs
those packages with the host's pip (``pip install --target``, from the function
directory, so that relative paths such as ``--find-links wheels`` in the file
are the directory's) and copies them into the image at :data:`DEPS_DIR`, which
goes first on the image's ``PYTHONPATH``. Anything pip reads in a requirements
file works: PyPI, another index, local wheels or directories.

The image's Python is Debian bookworm's 3.11. From a host with another Python,
pip is asked for packages built for 3.11, as wheels only (it cannot build a
source package for another Python).

The image is rebuilt when ``requirements.txt`` changes, not when an index has
newer releases of what it names: pin versions, or rebuild with ``--force``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from config.errors import FnqError

REQUIREMENTS = "requirements.txt"
DEPS_DIR = "/opt/fnq-deps"
CONTEXT_DIR = ".fnq-deps"  # in the build context (dot names are never function files)
IMAGE_PYTHON = (3, 11)
PIP_TIMEOUT_S = 900.0


class DependencyError(FnqError):
    """pip could not install a function's requirements."""


def has_requirements(function_dir: Path) -> bool:
    return (function_dir / REQUIREMENTS).is_file()


def dockerfile_lines(base_pythonpath: str) -> list[str]:
    """What a function image with requirements adds to its Dockerfile."""
    return [f"COPY {CONTEXT_DIR} {DEPS_DIR}/", f"ENV PYTHONPATH={DEPS_DIR}:{base_pythonpath}"]


def pip_command(function_dir: Path, target: Path) -> list[str]:
    cmd = [
        # Compiled here (the image's root file system is read-only: a container could
        # not keep what it compiles), for a faster first import in each container.
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--target", str(target.absolute()),
        "-r", str(function_dir.absolute() / REQUIREMENTS),
    ]  # fmt: skip
    if sys.version_info[:2] != IMAGE_PYTHON:
        version = ".".join(map(str, IMAGE_PYTHON))
        cmd += ["--python-version", version, "--only-binary=:all:"]
    return cmd


def install(function_dir: Path, target: Path) -> None:
    """Install ``function_dir``'s requirements into ``target`` (DependencyError on failure)."""
    cmd = pip_command(function_dir, target)
    try:
        proc = subprocess.run(
            cmd, cwd=function_dir, capture_output=True, text=True, check=False,
            timeout=PIP_TIMEOUT_S,
        )  # fmt: skip
    except FileNotFoundError:
        raise DependencyError(f"cannot run {cmd[0]} to install {REQUIREMENTS}") from None
    except subprocess.TimeoutExpired:
        raise DependencyError(
            f"pip did not install {function_dir / REQUIREMENTS} within {PIP_TIMEOUT_S:g} s"
        ) from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DependencyError(
            f"pip could not install {function_dir / REQUIREMENTS} (exit code "
            f"{proc.returncode}): {tail}"
        )


def add_to_context(tar: tarfile.TarFile, installed: Path) -> None:
    """Put the installed packages into the build context, owned by root, readable by all."""

    def normal(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"  # mtimes kept: the compiled files check them
        if info.isdir() or info.mode & 0o100:
            info.mode = 0o755
        elif not info.issym():
            info.mode = 0o644
        return info

    tar.add(installed, arcname=CONTEXT_DIR, recursive=True, filter=normal)


def summary(lines: Sequence[str]) -> str:
    """A requirements file's lines without comments and blanks, joined with "; " ("" when
    nothing is left: there is nothing to install)."""
    kept = (ln.split(" #", 1)[0].strip() for ln in lines if not ln.lstrip().startswith("#"))
    return "; ".join(line for line in kept if line)
