"""Function images built without a registry.

Two layers, both cached by content so that a second build does nothing:

* the base image ``fnq/python-fdk:<tag>``: a Debian rootfs made by
  ``debootstrap --variant=minbase --include=python3`` with the Python FDK
  installed by the host's pip into ``/opt/fdk``, imported with ``docker import``.
  The rootfs is kept under ``$XDG_CACHE_HOME/fnq/`` and skipped entirely once the
  base image exists;
* one image per function directory, ``fnq/<name>:latest``, built FROM the base
  by a three-line Dockerfile that copies the directory to ``/function`` (and,
  when it holds ``requirements.txt``, the packages pip installed from it:
  worker.image_deps).

A function directory holds ``func.py`` (an FDK handler ``handler(ctx, data)``)
and, optionally, a manifest ``fnq.toml``::

    name = "greeter"                                   # default: the directory's name
    entrypoint = ["/usr/bin/python3", "/function/func.py"]   # default: the FDK
    [env]
    GREETING = "Hello"

Each function image carries the label ``fnq.content``, a hash of everything
that went into it (base tag, Dockerfile, files); a tag that already carries
the same hash is not rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.images import Image

from config.domain import frozen_map
from config.errors import FnqError
from worker import image_deps

FDK_VERSION = "0.1.128"
SUITE = "bookworm"
BASE_REPO = "fnq/python-fdk"
MANIFEST_NAME = "fnq.toml"
CONTENT_LABEL = "fnq.content"
FUNCTION_LABEL = "fnq.function"
FDK_ENTRYPOINT = ("/usr/bin/python3", "/opt/fdk/bin/fdk", "/function/func.py", "handler")
# What `docker import` bakes into the base image. Changing it changes the base tag.
BASE_PYTHONPATH = "/opt/fdk"
BASE_CHANGES = (
    f"ENV PYTHONPATH={BASE_PYTHONPATH}",
    "ENV PYTHONUNBUFFERED=1",
    "WORKDIR /function",
    "ENTRYPOINT " + json.dumps(list(FDK_ENTRYPOINT)),
)
_MANIFEST_KEYS = ("name", "entrypoint", "env")
NAME_MAX = 128
_NAME = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")  # one docker repository component
ENV_KEY_MAX = 128
_ENV_KEY = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{ENV_KEY_MAX - 1}}}")
ENV_ENTRIES_MAX = 256
# A Dockerfile line must stay well under the engine's 64 KiB, escapes included.
ENV_VALUE_BYTES_MAX = 16_384
ENTRYPOINT_ARGS_MAX = 64
ENTRYPOINT_ARG_BYTES_MAX = 4096
_IGNORED = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache"}
_DOCKER_TIMEOUT_S = 600

Progress = Callable[[str], None]


class ImageBuildError(FnqError):
    """An image could not be built; the message says what to do about it."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fnq"


def base_tag() -> str:
    recipe = "\n".join((SUITE, FDK_VERSION, *BASE_CHANGES)).encode()
    return f"{BASE_REPO}:{FDK_VERSION}-{SUITE}-{hashlib.sha256(recipe).hexdigest()[:10]}"


# ------------------------------------------------------------------ sources


@dataclass(frozen=True, slots=True)
class FunctionSource:
    """One function directory, as read from disk."""

    name: str
    path: Path
    entrypoint: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=frozen_map)

    @property
    def image(self) -> str:
        return f"fnq/{self.name}:latest"

    def files(self) -> list[Path]:
        """Files and symlinks copied into the image, in a stable order. A symlink is
        copied as a link, as ``docker build`` copies one (it is not followed: its
        target may be outside the directory, or be a directory)."""
        out = []
        for path in sorted(self.path.rglob("*")):
            rel = path.relative_to(self.path)
            if any(part in _IGNORED or part.startswith(".") for part in rel.parts):
                continue
            if path.is_symlink() or path.is_file():
                out.append(path)
        return out

    def dockerfile(self, base: str) -> str:
        lines = [f"FROM {base}", "COPY . /function/"]
        if image_deps.has_requirements(self.path):
            lines += image_deps.dockerfile_lines(BASE_PYTHONPATH)
        lines += [
            f"ENV {key}={_dockerfile_quote(value)}" for key, value in sorted(self.env.items())
        ]
        if self.entrypoint is not None:
            lines.append("ENTRYPOINT " + json.dumps(list(self.entrypoint)))
        return "\n".join(lines) + "\n"


def load_function(path: Path) -> FunctionSource:
    """Read a function directory; ImageBuildError if it is not one."""
    path = path.resolve()
    if not (path / "func.py").is_file():
        raise ImageBuildError(f"{path} is not a function directory: it has no func.py")
    file = path / MANIFEST_NAME
    manifest = _read_manifest(file)
    unknown = sorted(set(manifest) - set(_MANIFEST_KEYS))
    if unknown:
        raise ImageBuildError(
            f"{file}: unknown key {unknown[0]!r} (the manifest takes name, entrypoint and [env])"
        )
    name = _manifest_name(file, manifest.get("name"), path.name)
    entry = manifest.get("entrypoint")
    if entry is not None:
        entry = _manifest_entrypoint(file, entry)
    return FunctionSource(
        name=name,
        path=path,
        entrypoint=entry,
        env=frozen_map(_manifest_env(file, manifest.get("env", {}))),
    )


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImageBuildError(f"{file}: cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageBuildError(f"{file}: not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ImageBuildError(f"{file}: {exc}") from None


def _manifest_name(file: Path, value: object, default: str) -> str:
    if value is None:
        name = default.lower()
        if not _valid_name(name):
            raise ImageBuildError(
                f"{file.parent}: the directory's name {default!r} is not a valid image name: "
                f"set name in {MANIFEST_NAME} (lower-case letters, digits, '.', '_', '-', "
                f"at most {NAME_MAX} characters)"
            )
        return name
    if not isinstance(value, str) or not _valid_name(value.lower()):
        raise ImageBuildError(
            f"{file}: name must be an image name of lower-case letters, digits and "
            f"'.', '_', '-' between them, at most {NAME_MAX} characters (got {_show(value)})"
        )
    return value.lower()


def _valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX and _NAME.fullmatch(name) is not None


def _manifest_entrypoint(file: Path, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= ENTRYPOINT_ARGS_MAX:
        raise ImageBuildError(
            f"{file}: entrypoint must be a list of 1 to {ENTRYPOINT_ARGS_MAX} strings "
            f"(got {_show(value)})"
        )
    for i, arg in enumerate(value):
        if not isinstance(arg, str) or "\0" in arg or _utf8_len(arg) > ENTRYPOINT_ARG_BYTES_MAX:
            raise ImageBuildError(
                f"{file}: entrypoint[{i}] must be a string without NUL of at most "
                f"{ENTRYPOINT_ARG_BYTES_MAX} bytes (got {_show(arg)})"
            )
    if not value[0]:
        raise ImageBuildError(f"{file}: entrypoint[0] must name a program, not be empty")
    return tuple(value)


def _manifest_env(file: Path, value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ImageBuildError(f"{file}: env must be a table ([env]) (got {_show(value)})")
    if len(value) > ENV_ENTRIES_MAX:
        raise ImageBuildError(f"{file}: [env] may hold at most {ENV_ENTRIES_MAX} entries")
    env: dict[str, str] = {}
    for key, val in value.items():
        if not _ENV_KEY.fullmatch(key):
            raise ImageBuildError(
                f"{file}: env key {_show(key)} is not an environment variable name "
                f"(letters, digits and '_', not starting with a digit, at most "
                f"{ENV_KEY_MAX} characters)"
            )
        if (
            not isinstance(val, str)
            or any(c in val for c in "\0\n\r")
            or _utf8_len(val) > ENV_VALUE_BYTES_MAX
        ):
            raise ImageBuildError(
                f"{file}: env.{key} must be a string on one line (no NUL, CR or LF) of at "
                f"most {ENV_VALUE_BYTES_MAX} bytes (got {_show(val)})"
            )
        env[key] = val
    return env


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _show(value: object) -> str:
    """A value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dockerfile_quote(value: str) -> str:
    """A double-quoted Dockerfile word that reads back as ``value``: no variable is
    expanded and no quote ends early (the value holds no line break)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def find_functions(paths: Iterable[Path]) -> list[FunctionSource]:
    """Function directories named by ``paths``: each is one, or a folder of them."""
    found: list[FunctionSource] = []
    for path in paths:
        if (path / "func.py").is_file():
            found.append(load_function(path))
        elif path.is_dir():
            inside = [load_function(p) for p in sorted(path.iterdir()) if (p / "func.py").is_file()]
            if not inside:
                raise ImageBuildError(
                    f"{path} is neither a function directory (no func.py) nor a folder of them"
                )
            found += inside
        else:
            raise ImageBuildError(f"{path} is neither a function directory nor a folder of them")
    names = [f.name for f in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ImageBuildError(f"two function directories share the name {', '.join(dupes)}")
    return found


# ------------------------------------------------------------------ builder


@dataclass(frozen=True, slots=True)
class BuildResult:
    image: str
    built: bool  # False: the cached image was up to date
    seconds: float


class ImageBuilder:
    """Builds the base image and function images; every step is skipped when cached."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        cache: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._client = client or docker.from_env(timeout=_DOCKER_TIMEOUT_S)
        self._own_client = client is None
        self._cache = cache or cache_dir()
        self._say: Progress = progress or (lambda _msg: None)

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> ImageBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self, functions: Sequence[FunctionSource], force: bool = False) -> list[BuildResult]:
        base = self.ensure_base()
        return [base] + [self.build_function(fn, force=force) for fn in functions]

    # -------------------------------------------------------------- base

    def ensure_base(self) -> BuildResult:
        started = time.monotonic()
        tag = base_tag()
        if self._image_labels(tag) is not None:
            self._say(f"{tag}: up to date")
            return BuildResult(tag, False, time.monotonic() - started)
        rootfs = self._ensure_rootfs()
        self._ensure_fdk(rootfs)
        self._import(rootfs, tag)
        elapsed = time.monotonic() - started
        self._say(f"{tag}: imported in {elapsed:.1f}s")
        return BuildResult(tag, True, elapsed)

    def _ensure_rootfs(self) -> Path:
        rootfs = self._cache / f"rootfs-{SUITE}"
        if (rootfs / "usr" / "bin" / "python3").exists():
            return rootfs
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building the base image needs root (debootstrap makes a root-owned rootfs): "
                "run `fnq images build` as root once"
            )
        if shutil.which("debootstrap") is None:
            raise ImageBuildError("debootstrap is not installed: apt-get install -y debootstrap")
        partial = rootfs.with_name(rootfs.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._say(f"debootstrap {SUITE} into {partial} (about a minute)")
        cmd = ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(partial)]
        self._run(cmd, "debootstrap")
        partial.rename(rootfs)
        return rootfs

    def _ensure_fdk(self, rootfs: Path) -> None:
        target = rootfs / "opt" / "fdk"
        if (target / "fdk" / "__init__.py").exists():
            return
        if importlib.util.find_spec("pip") is None:
            raise ImageBuildError(
                f"pip is not installed for {sys.executable}: apt-get install -y python3-pip"
            )
        partial = target.with_name("fdk.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self._say(f"pip install fdk=={FDK_VERSION} into {target}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(partial),
            f"fdk=={FDK_VERSION}",
        ]
        self._run(cmd, "pip (python3 -m pip)")
        partial.rename(target)

    def _run(self, cmd: list[str], what: str) -> None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ImageBuildError(f"{what} is not installed: cannot run {cmd[0]}") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ImageBuildError(f"{what} failed with exit code {proc.returncode}: {tail}")

    def _import(self, rootfs: Path, tag: str) -> None:
        self._say(f"docker import {rootfs} as {tag}")
        repo, _, version = tag.rpartition(":")
        if shutil.which("tar") is None:
            raise ImageBuildError("tar is not installed: apt-get install -y tar")
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "-c", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert tar.stdout is not None and tar.stderr is not None
        try:
            chunks = iter(lambda: tar.stdout.read(1 << 20) if tar.stdout else b"", b"")
            self._client.api.import_image_from_stream(
                chunks, repository=repo, tag=version, changes=list(BASE_CHANGES)
            )
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"docker import failed: {exc.explanation or exc}") from None
        finally:
            tar.stdout.close()
            err = tar.stderr.read().decode(errors="replace").strip()
            tar.stderr.close()
            code = tar.wait()
        if code != 0:
            raise ImageBuildError(f"tar of {rootfs} failed with exit code {code}: {err}")

    # ---------------------------------------------------------- functions

    def build_function(self, fn: FunctionSource, force: bool = False) -> BuildResult:
        started = time.monotonic()
        base = base_tag()
        dockerfile = fn.dockerfile(base)
        content = _content_hash(base, dockerfile, fn)
        old = self._find(fn.image)
        if not force and old is not None and old.labels.get(CONTENT_LABEL) == content:
            self._say(f"{fn.image}: up to date")
            return BuildResult(fn.image, False, time.monotonic() - started)
        with tempfile.TemporaryDirectory(prefix="fnq-deps-") as tmp:
            deps = self._install_requirements(fn, Path(tmp) / "deps")
            context = _context_tar(dockerfile, fn, deps)
        try:
            stream = self._client.api.build(
                fileobj=context,
                custom_context=True,
                tag=fn.image,
                labels={CONTENT_LABEL: content, FUNCTION_LABEL: fn.name},
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            _check_build_stream(stream, fn.image)
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"building {fn.image} failed: {exc.explanation or exc}") from None
        if old is not None:
            self._drop_replaced(old, fn.image)
        elapsed = time.monotonic() - started
        self._say(f"{fn.image}: built in {elapsed:.1f}s")
        return BuildResult(fn.image, True, elapsed)

    def _install_requirements(self, fn: FunctionSource, target: Path) -> Path | None:
        """The packages of ``fn``'s requirements.txt, installed into ``target``; None
        when it has none."""
        if not image_deps.has_requirements(fn.path):
            return None
        wanted = image_deps.summary(
            (fn.path / image_deps.REQUIREMENTS).read_text(errors="replace").splitlines()
        )
        target.mkdir()
        if not wanted:  # comments or options only: nothing to install
            return target
        self._say(f"{fn.image}: pip install {wanted}")
        try:
            image_deps.install(fn.path, target)
        except image_deps.DependencyError as exc:
            raise ImageBuildError(f"building {fn.image} failed: {exc}") from None
        return target

    def _image_labels(self, image: str) -> dict[str, str] | None:
        """The image's labels, or None when the image does not exist."""
        found = self._find(image)
        return None if found is None else dict(found.labels)

    def _find(self, image: str) -> Image | None:
        try:
            return self._client.images.get(image)
        except docker.errors.ImageNotFound:
            return None

    def _drop_replaced(self, old: Image, tag: str) -> None:
        """Remove the image a rebuild took the tag from, unless something still uses it."""
        new = self._find(tag)
        if old.id is None or (new is not None and new.id == old.id):
            return
        try:
            self._client.images.remove(old.id)
        except docker.errors.APIError as exc:  # in use by a container: leave it be
            self._say(f"{tag}: kept the previous image {old.short_id}: {exc.explanation or exc}")


def _content_hash(base: str, dockerfile: str, fn: FunctionSource) -> str:
    digest = hashlib.sha256()
    digest.update(base.encode() + b"\0" + dockerfile.encode() + b"\0")
    for path in fn.files():
        digest.update(str(path.relative_to(fn.path)).encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link:" + os.fsencode(os.readlink(path)) + b"\0")
        else:
            digest.update(b"%o:" % _file_mode(path) + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _context_tar(dockerfile: str, fn: FunctionSource, deps: Path | None = None) -> io.BytesIO:
    """A build context: the Dockerfile plus the function's files (and its installed
    packages), owned by root, world-readable."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        if deps is not None:
            image_deps.add_to_context(tar, deps)
        _add_bytes(tar, "Dockerfile", dockerfile.encode())
        for path in fn.files():
            name = str(path.relative_to(fn.path))
            if path.is_symlink():
                link = tarfile.TarInfo(name)
                link.type, link.linkname, link.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                tar.addfile(link)
            else:
                _add_bytes(tar, name, path.read_bytes(), _file_mode(path))
    buf.seek(0)
    return buf


def _file_mode(path: Path) -> int:
    """0o755 for a file its owner may run (a script named as the entrypoint), else 0o644."""
    return 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _check_build_stream(stream: Iterator[dict[str, Any]], image: str) -> None:
    last = ""
    for event in stream:
        if "error" in event:
            raise ImageBuildError(f"building {image} failed: {str(event['error']).strip()}")
        if "stream" in event and str(event["stream"]).strip():
            last = str(event["stream"]).strip()
    if not last.startswith("Successfully"):
        raise ImageBuildError(f"building {image} ended without success (last output: {last!r})")
