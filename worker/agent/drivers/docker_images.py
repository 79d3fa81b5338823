"""The images of the docker driver's containers (a part of
:class:`docker.DockerDriver`).

Each create inspects its image, for the image its name stands for now (a tag
rebuilt or pulled anew names another); pulls it when the engine does not have
it (within ``FN_HOT_PULL_TIMEOUT_MSECS``, one pull per image however many
callers wait); and refuses one that declares VOLUME unless
``FN_IMAGE_ENABLE_VOLUME`` is set. What an image declares is remembered by
its id, and so is, once asked, whether it has ``/bin/sh``. At start the
driver loads the images of ``FN_DOCKER_LOAD_FILE``, if set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import Settings
from worker.agent.drivers.docker_api import (
    DockerAPI,
    DockerError,
    DockerTimeout,
    image_path,
    split_reference,
)
from worker.agent.drivers.docker_config import image_command, image_volumes
from worker.agent.drivers.image_cleaner import Image
from worker.agent.errors import ImageHasVolume, ImageNotFound, ImagePullTimeout

log = logging.getLogger("fnq.agent.docker")


@dataclass(slots=True)
class ImageFacts:
    id: str  # the image's id, as the engine gives it
    volumes: list[str]  # declared VOLUMEs
    command: list[str]  # entrypoint + command
    shell: bool | None = None  # has /bin/sh (None: not asked yet)


class DriverImages:
    """The images of :class:`docker.DockerDriver`, whose ``__init__`` sets the
    attributes declared here."""

    settings: Settings
    api: DockerAPI
    _images: dict[str, ImageFacts]  # by image id
    _pulls: dict[str, asyncio.Task[None]]

    async def _load(self, path: Path) -> None:
        timeout_s = self.settings.secs("hot_pull_timeout_msecs")
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            await self.api.stream_json(
                "POST", "/images/load", params={"quiet": "1"}, timeout_s=timeout_s, data=handle
            )
        finally:
            await asyncio.to_thread(handle.close)
        self._images.clear()
        log.info("loaded images from %s", path)

    def _image_removed(self, image: Image) -> None:
        self._images.pop(image.id, None)

    async def image_ids(self, images: Collection[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for image in images:
            try:
                inspect = await self.api.request("GET", f"/images/{image_path(image)}/json")
            except DockerError:  # no such image any more, or the engine cannot tell now
                continue
            image_id = (inspect or {}).get("Id")
            if isinstance(image_id, str) and image_id:
                found[image] = image_id
        return found

    async def _check_image(self, image: str) -> ImageFacts:
        """What the image ``image`` names now declares (one inspect: the name may stand
        for another image since the last container, rebuilt under the same tag)."""
        inspect = await self._inspect_or_pull(image)
        image_id = str(inspect.get("Id") or image)
        facts = self._images.get(image_id)
        if facts is None:
            facts = ImageFacts(image_id, image_volumes(inspect), image_command(inspect))
            self._images[image_id] = facts
        if facts.volumes and not self.settings.image_enable_volume:
            raise ImageHasVolume(
                f"image {image} declares VOLUME {', '.join(facts.volumes)}; "
                "set FN_IMAGE_ENABLE_VOLUME=true to allow it"
            )
        return facts

    async def _inspect_or_pull(self, image: str) -> dict[str, Any]:
        try:
            return dict(await self.api.request("GET", f"/images/{image_path(image)}/json") or {})
        except DockerError as exc:
            if exc.status != 404:
                raise
        task = self._pulls.get(image)
        if task is None:
            task = asyncio.create_task(self._pull(image), name=f"fnq-pull-{image}")
            self._pulls[image] = task
            task.add_done_callback(lambda _t: self._pulls.pop(image, None))
        await asyncio.shield(task)
        try:
            return dict(await self.api.request("GET", f"/images/{image_path(image)}/json") or {})
        except DockerError as exc:
            if exc.status == 404:
                raise ImageNotFound(f"image {image} not found after pulling it") from None
            raise

    async def _pull(self, image: str) -> None:
        timeout_s = self.settings.secs("hot_pull_timeout_msecs")
        repo, tag = split_reference(image)
        params = {"fromImage": repo, **({"tag": tag} if tag else {})}
        log.info("pulling image %s", image)
        try:
            await self.api.stream_json("POST", "/images/create", params=params, timeout_s=timeout_s)
        except DockerTimeout:
            raise ImagePullTimeout(f"pulling image {image} took more than {timeout_s:g}s") from None
        except DockerError as exc:
            if exc.status is None:
                raise
            raise ImageNotFound(f"image {image} not found (pull failed: {exc})") from None
