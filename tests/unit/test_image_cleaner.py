"""Which images the cleaner removes (the choice; the engine part is in tests/docker)."""

from __future__ import annotations

from worker.agent.drivers.image_cleaner import Image, exempt_tags, normalise, to_remove

MB = 1024 * 1024


def img(name: str, size_mb: int, created: float) -> Image:
    return Image(id=f"sha256:{name}", size=size_mb * MB, tags=(f"{name}:latest",), created=created)


IMAGES = [img("a", 100, 1), img("b", 100, 2), img("c", 100, 3), img("d", 100, 4)]


def test_least_recently_used_idle_images_go_until_under_the_limit() -> None:
    chosen = to_remove(IMAGES, lambda i: False, frozenset(), 250 * MB, {})
    assert [i.id for i in chosen] == ["sha256:a", "sha256:b"]  # 400 -> 200 MB


def test_busy_and_exempt_images_stay_and_use_counts_as_recent() -> None:
    busy = {"sha256:a"}
    chosen = to_remove(
        IMAGES,
        lambda i: i.id in busy,
        exempt_tags("b"),  # "b" means b:latest
        150 * MB,
        {"sha256:c": 100.0},  # used recently: after d was created
    )
    assert [i.id for i in chosen] == ["sha256:d", "sha256:c"]


def test_under_the_limit_nothing_goes() -> None:
    assert to_remove(IMAGES, lambda i: False, frozenset(), 401 * MB, {}) == []


def test_references_are_normalised() -> None:
    assert normalise("fnq/echo") == "fnq/echo:latest"
    assert normalise("localhost:5000/fnq/echo") == "localhost:5000/fnq/echo:latest"
    assert normalise("fnq/echo:1") == "fnq/echo:1"
    assert normalise("fnq/echo@sha256:abc") == "fnq/echo@sha256:abc"
