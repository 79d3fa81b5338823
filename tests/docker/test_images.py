"""`fnq images build`: function directories, manifests, content-cached builds."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from click.testing import CliRunner

from worker import image_deps
from worker.cli import cli
from worker.images import (
    ImageBuilder,
    ImageBuildError,
    _content_hash,
    _context_tar,
    find_functions,
    load_function,
)


def write_function(directory: Path, body: str = "hello") -> Path:
    directory.mkdir(parents=True)
    (directory / "func.py").write_text(f"def handler(ctx, data=None):\n    return {body!r}\n")
    return directory


def test_manifest_sets_name_entrypoint_and_env(tmp_path: Path) -> None:
    path = write_function(tmp_path / "dir")
    (path / "fnq.toml").write_text(
        'name = "Greeter"\nentrypoint = ["/usr/bin/python3", "/function/func.py"]\n'
        '[env]\nGREETING = "hi"\n'
    )
    fn = load_function(path)
    assert fn.image == "fnq/greeter:latest"
    dockerfile = fn.dockerfile("base:1")
    assert 'ENTRYPOINT ["/usr/bin/python3", "/function/func.py"]' in dockerfile
    assert 'ENV GREETING="hi"' in dockerfile


def test_a_folder_of_functions_and_bad_paths(tmp_path: Path) -> None:
    write_function(tmp_path / "all" / "one")
    write_function(tmp_path / "all" / "two")
    assert [f.name for f in find_functions([tmp_path / "all"])] == ["one", "two"]
    with pytest.raises(ImageBuildError, match=r"no func\.py"):
        load_function(tmp_path / "all")
    with pytest.raises(ImageBuildError, match="share the name"):
        find_functions([tmp_path / "all", tmp_path / "all" / "one"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageBuildError, match="neither a function directory"):
        find_functions([tmp_path / "empty"])  # a wrong path builds nothing: say so


@pytest.mark.integration
def test_build_is_idempotent(
    function_images: list[str], tmp_path: Path, docker_engine: Any, settings_env: Path
) -> None:
    name = f"fnq-idem-{secrets.token_hex(4)}"
    path = write_function(tmp_path / name)
    runner = CliRunner()
    try:
        first = runner.invoke(cli, ["images", "build", "--json", str(path)])
        assert first.exit_code == 0, first.output
        second = runner.invoke(cli, ["images", "build", "--json", str(path)])
        assert second.exit_code == 0, second.output
        built_first = {r["image"]: r["built"] for r in json.loads(first.stdout)}
        built_second = {r["image"]: r["built"] for r in json.loads(second.stdout)}
        assert built_first[f"fnq/{name}:latest"] is True
        assert not any(built_second.values())  # base and function both cached
        (path / "func.py").write_text("def handler(ctx, data=None):\n    return 'changed'\n")
        replaced = docker_engine.images.get(f"fnq/{name}:latest").id
        third = runner.invoke(cli, ["images", "build", "--json", str(path)])
        assert {r["image"]: r["built"] for r in json.loads(third.stdout)}[f"fnq/{name}:latest"]
        with pytest.raises(docker.errors.ImageNotFound):
            docker_engine.images.get(replaced)  # the old build does not linger
    finally:
        docker_engine.images.remove(f"fnq/{name}:latest", force=True)


def test_missing_debootstrap_is_one_clear_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run here
    offline = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41")
    builder = ImageBuilder(client=offline, cache=tmp_path / "cache")
    with pytest.raises(ImageBuildError, match=r"debootstrap is not installed: apt-get install"):
        builder._ensure_rootfs()
    offline.close()


def _with_links(path: Path) -> Path:
    """A function directory with a link to a file in it, one to a host file, one to a
    directory, one in a loop, and a script its owner may run."""
    (path / "lib").mkdir()
    (path / "lib" / "real.py").write_text("WORD = 'linked'\n")
    (path / "helper.py").symlink_to("lib/real.py")
    (path / "host").symlink_to("/etc/hostname")
    (path / "libdir").symlink_to("lib")
    (path / "loop").symlink_to("loop")
    (path / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (path / "run.sh").chmod(0o755)
    return path


def test_symlinks_go_in_as_links_and_run_bits_stay(tmp_path: Path) -> None:
    fn = load_function(_with_links(write_function(tmp_path / "links")))
    with tarfile.open(fileobj=_context_tar(fn.dockerfile("base:1"), fn)) as tar:
        entries = {info.name: info for info in tar.getmembers()}
    links = {name: info.linkname for name, info in entries.items() if info.issym()}
    assert links == {"helper.py": "lib/real.py", "host": "/etc/hostname", "libdir": "lib",
                     "loop": "loop"}  # fmt: skip
    assert entries["helper.py"].size == 0  # no copy of the target's content
    assert entries["run.sh"].mode == 0o755
    assert entries["func.py"].mode == entries["lib/real.py"].mode == 0o644
    before = _content_hash("base:1", "d", fn)
    (tmp_path / "links" / "helper.py").unlink()
    (tmp_path / "links" / "helper.py").symlink_to("lib/other.py")
    assert _content_hash("base:1", "d", fn) != before  # a link's target is part of it
    retargeted = _content_hash("base:1", "d", fn)
    (tmp_path / "links" / "run.sh").chmod(0o644)
    assert _content_hash("base:1", "d", fn) != retargeted  # and so is the run bit


@pytest.mark.integration
def test_an_image_keeps_the_links_and_run_bits(
    function_images: list[str], tmp_path: Path, docker_engine: Any, settings_env: Path
) -> None:
    name = f"fnq-links-{secrets.token_hex(4)}"
    path = _with_links(write_function(tmp_path / name))
    image = f"fnq/{name}:latest"
    try:
        built = CliRunner().invoke(cli, ["images", "build", "--json", str(path)])
        assert built.exit_code == 0, built.output
        script = (
            "cd /function && readlink helper.py host libdir && cat helper.py libdir/real.py"
            " && ./run.sh && cat host"
        )
        out = docker_engine.containers.run(
            image, entrypoint=["/bin/sh", "-c", script], network_mode="none", remove=True
        ).decode()
        lines = out.splitlines()
        assert lines[:3] == ["lib/real.py", "/etc/hostname", "lib"]
        assert lines[3:6] == ["WORD = 'linked'", "WORD = 'linked'", "ran"]
        host_name = Path("/etc/hostname").read_text().strip()
        assert host_name not in lines[6:]  # the image's own file, not the host's
    finally:
        docker_engine.images.remove(image, force=True)


def _wheel(directory: Path, name: str, word: str) -> None:
    """A pure-Python wheel of one module, ``name.WORD = word``, made by hand (offline)."""
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": f"WORD = {word!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }

    def digest(data: bytes) -> str:
        raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        return "sha256=" + raw.decode()

    record = "".join(f"{p},{digest(d)},{len(d)}\n" for p, d in files.items())
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{name}-1.0-py3-none-any.whl", "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")


def _with_requirements(path: Path, requirement: str = "greetdep==1.0") -> Path:
    _wheel(path / "wheels", "greetdep", "from a package")
    (path / "requirements.txt").write_text(
        f"# no index here: the wheel is in the directory\n--no-index\n--find-links wheels\n"
        f"{requirement}  # pinned\n"
    )
    (path / "func.py").write_text(
        "import greetdep\n\n\ndef handler(ctx, data=None):\n    return greetdep.WORD\n"
    )
    return path


def test_requirements_add_their_packages_to_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = load_function(write_function(tmp_path / "plain"))
    assert "fnq-deps" not in plain.dockerfile("base:1")
    fn = load_function(_with_requirements(write_function(tmp_path / "deps")))
    lines = fn.dockerfile("base:1").splitlines()
    assert lines[:4] == [
        "FROM base:1",
        "COPY . /function/",
        f"COPY .fnq-deps {image_deps.DEPS_DIR}/",
        f"ENV PYTHONPATH={image_deps.DEPS_DIR}:/opt/fdk",
    ]
    text = (fn.path / "requirements.txt").read_text().splitlines()
    assert image_deps.summary(text) == "--no-index; --find-links wheels; greetdep==1.0"
    assert image_deps.summary(["# only a comment", "  ", "#x"]) == ""
    cmd = image_deps.pip_command(fn.path, tmp_path / "out")
    assert "--python-version" not in cmd  # the host's Python is the image's
    monkeypatch.setattr(image_deps, "IMAGE_PYTHON", (3, 99))
    cmd = image_deps.pip_command(fn.path, tmp_path / "out")
    assert cmd[-3:] == ["--python-version", "3.99", "--only-binary=:all:"]


@pytest.mark.integration
def test_an_image_with_requirements_imports_them(
    function_images: list[str], tmp_path: Path, docker_engine: Any, settings_env: Path
) -> None:
    name = f"fnq-deps-{secrets.token_hex(4)}"
    path = _with_requirements(write_function(tmp_path / name))
    image = f"fnq/{name}:latest"
    runner = CliRunner()
    try:
        built = runner.invoke(cli, ["images", "build", str(path)])
        assert built.exit_code == 0, built.output
        assert f"{image}: pip install --no-index; --find-links wheels; greetdep==1.0" in (
            built.stderr
        )
        # The compiled file is there and matches its source (its mtime in the header).
        script = (
            "import importlib.util as u, os, fdk, greetdep; f = greetdep.__file__;"
            " pyc = open(u.cache_from_source(f), 'rb').read();"
            " fresh = int.from_bytes(pyc[8:12], 'little') == int(os.stat(f).st_mtime);"
            " print(greetdep.WORD, f, fresh)"
        )
        out = docker_engine.containers.run(  # read-only, as fnq runs it: nothing rewritten
            image, entrypoint=["/usr/bin/python3", "-c", script], network_mode="none",
            read_only=True, remove=True,
        ).decode()  # fmt: skip
        assert out.split() == [
            "from", "a", "package", f"{image_deps.DEPS_DIR}/greetdep.py", "True"
        ]  # fmt: skip
        again = runner.invoke(cli, ["images", "build", "--json", str(path)])
        assert not {r["image"]: r["built"] for r in json.loads(again.stdout)}[image]

        _with_requirements(path, "nosuchpackage==1.0")  # a change: built again, and fails
        failed = runner.invoke(cli, ["images", "build", str(path)])
        assert failed.exit_code != 0
        last = failed.stderr.strip().splitlines()[-1]
        assert f"building {image} failed: pip could not install" in last, failed.stderr
        assert "nosuchpackage" in last
    finally:
        docker_engine.images.remove(image, force=True)
