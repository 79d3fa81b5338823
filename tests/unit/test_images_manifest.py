"""The fnq.toml manifest of a function directory and the Dockerfile made from it."""

from __future__ import annotations

from pathlib import Path

from worker.images import load_function


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
