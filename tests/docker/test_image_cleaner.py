"""The image cleaner on the real engine: idle images go, used and exempt ones stay."""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from config.settings import Settings
from tests.docker.conftest import spec
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.image_cleaner import ImageCleaner, exempt_tags

pytestmark = pytest.mark.integration


def tiny_image(docker_engine: Any, repo: str) -> str:
    """A one-file image of its own (distinct content, so a distinct id)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        body = secrets.token_bytes(64)
        info = tarfile.TarInfo("marker")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    docker_engine.api.import_image_from_data(data.getvalue(), repository=repo, tag="1")
    return f"{repo}:1"


def tags_on(docker_engine: Any) -> set[str]:
    return {t for image in docker_engine.images.list() for t in image.tags}


async def test_idle_images_are_removed_and_used_or_exempt_ones_kept(
    function_images: list[str], docker_engine: Any, make_settings: Callable[..., Settings]
) -> None:
    repo = f"fnq-clean-{secrets.token_hex(3)}"
    idle = tiny_image(docker_engine, f"{repo}/idle")
    kept = tiny_image(docker_engine, f"{repo}/kept")
    # Every other image on this engine is exempt, so that only the test's can go;
    # but the echo image, which a container of this worker uses, must be left alone
    # for being busy (the engine would refuse to remove it anyway).
    others = tags_on(docker_engine) - {idle, kept, "fnq/echo:latest"}
    driver = DockerDriver(make_settings())
    await driver.start()
    try:
        # A container of the echo image keeps it busy; the cleaner never touches it.
        container = await driver.create(spec("fnq/echo:latest"))
        # The cleaner as the driver makes it, swept by hand (no background sweep
        # here: it must not run before the container exists).
        cleaner = ImageCleaner(
            driver.api,
            1,
            exempt_tags(" ".join([*others, kept])),
            in_use=lambda: {c.spec.image for c in driver.containers},
            on_removed=lambda _image: None,
        )
        tried: list[str] = []
        remove = cleaner._remove

        async def recording(image: Any) -> bool:
            tried.extend(image.tags)
            return await remove(image)

        cleaner._remove = recording  # type: ignore[method-assign]
        await cleaner.sweep()
        on_engine = tags_on(docker_engine)
        assert "fnq/echo:latest" not in tried
        assert idle in tried and idle not in on_engine
        assert kept in on_engine and "fnq/echo:latest" in on_engine
        assert others <= on_engine
        await container.remove()
    finally:
        await driver.close()
        for tag in (idle, kept):
            if tag in tags_on(docker_engine):
                docker_engine.images.remove(tag)


async def test_the_driver_runs_a_cleaner_only_when_a_limit_is_set(
    function_images: list[str], make_settings: Callable[..., Settings]
) -> None:
    for limit, expected in ((0, False), (10**15, True)):  # 1 PB: it would never remove
        driver = DockerDriver(make_settings(image_clean_max_size=limit))
        await driver.start()
        try:
            assert (driver.cleaner is not None) is expected
        finally:
            await driver.close()
