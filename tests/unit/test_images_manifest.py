"""The fnq.toml manifest of a function directory and the Dockerfile made from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.images import ImageBuildError, load_function


def function_dir(tmp_path: Path, manifest: str | bytes | None, name: str = "fn") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "func.py").write_text("def handler(ctx, data=None):\n    return 'ok'\n")
    if isinstance(manifest, str):
        (path / "fnq.toml").write_text(manifest, encoding="utf-8")
    elif manifest is not None:
        (path / "fnq.toml").write_bytes(manifest)
    return path


def test_env_values_reach_the_dockerfile_unexpanded_and_unescaped(tmp_path: Path) -> None:
    # Docker expands $VAR in a double-quoted ENV word and keeps JSON's \uXXXX as is.
    manifest = '[env]\nHOME_COPY = "$HOME"\nGREETING = "h\u00e9llo \\\\ \\"you\\""\n'
    fn = load_function(function_dir(tmp_path, manifest))
    lines = fn.dockerfile("base:1").splitlines()
    assert 'ENV GREETING="h\u00e9llo \\\\ \\"you\\""' in lines
    assert 'ENV HOME_COPY="\\$HOME"' in lines


def refused(path: Path) -> str:
    with pytest.raises(ImageBuildError) as info:
        load_function(path)
    return str(info.value)


def test_a_manifest_that_is_not_utf8_is_refused_by_file(tmp_path: Path) -> None:
    path = function_dir(tmp_path, b'name = "\xff"\n')  # was a UnicodeDecodeError
    assert refused(path) == f"{path / 'fnq.toml'}: not UTF-8 text (byte 8)"


@pytest.mark.parametrize(
    ("manifest", "key"),
    [
        ("name = 5", "name"),  # was the image fnq/5
        ('name = "a b"', "name"),  # was the image "fnq/a b"
        ('name = "x/../y"', "name"),
        ("entrypoint = []", "entrypoint"),  # was ENTRYPOINT [] (the container runs nothing)
        ('entrypoint = ["a\\u0000b"]', "entrypoint[0]"),
        ('entrypoint = [""]', "entrypoint[0]"),
        ("[env]\nX = 1", "env.X"),  # was X=1
        ("[env]\nX = true", "env.X"),  # was X=True
        ("[env]\nX = [1]", "env.X"),
        ('[env]\nX = "a\\nb"', "env.X"),
        ('[env]\n"X\\nRUN touch /pwned" = ""', "env key"),  # was a RUN line of its own
        ('[env]\n"A B" = ""', "env key"),  # was ENV A B="" (A set to 'B=""')
        ('env = "X=1"', "env"),
        ('entry_point = ["/bin/true"]', "unknown key 'entry_point'"),  # was ignored
    ],
)
def test_a_bad_value_is_refused_by_file_and_key(tmp_path: Path, manifest: str, key: str) -> None:
    path = function_dir(tmp_path, manifest)
    assert refused(path).startswith(f"{path / 'fnq.toml'}: {key}")


def test_a_directory_name_that_is_no_image_name_needs_a_name(tmp_path: Path) -> None:
    path = function_dir(tmp_path, None, name="My Func")
    assert refused(path).startswith(f"{path}: the directory's name 'My Func' is not a valid")
    (path / "fnq.toml").write_text('name = "My-Func"\n')
    assert load_function(path).image == "fnq/my-func:latest"
