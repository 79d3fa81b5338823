"""Keep the engine's images under FN_IMAGE_CLEAN_MAX_SIZE by removing idle ones.

Off unless FN_IMAGE_CLEAN_MAX_SIZE > 0. Every few seconds the cleaner lists
the engine's images; while their total size is at or over the limit it
removes the least recently used image that is idle, oldest first, at most two
per second. An image is idle when no container of this worker uses it; an
image that a container of another worker uses is refused by the engine (it
is in use) and stays. Images with a tag in FN_IMAGE_CLEAN_EXEMPT_TAGS
(whitespace-separated references, ``repo`` meaning ``repo:latest``) are never
removed. Least recently used: the last time a container of this worker used
it, else when it was created.

A removed image that a function needs again is pulled again when a registry
is reachable; offline, calls of that function end with "image not found".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.agent.drivers.docker_api import DockerAPI, DockerError, image_path

log = logging.getLogger("fnq.agent.image_cleaner")

SWEEP_EVERY_S = 2.0
REMOVE_TIMEOUT_S = 60.0
MAX_REMOVALS_PER_S = 2


@dataclass(frozen=True, slots=True)
class Image:
    id: str
    size: int
    tags: tuple[str, ...]
    created: float  # seconds since the epoch


def normalise(ref: str) -> str:
    """``repo`` -> ``repo:latest``; a reference with a tag or digest is kept."""
    last = ref.rsplit("/", 1)[-1]
    return ref if (":" in last or "@" in ref) else f"{ref}:latest"


def exempt_tags(text: str) -> frozenset[str]:
    return frozenset(normalise(t) for t in text.split())


def to_remove(
    images: Iterable[Image],
    busy: Callable[[Image], bool],
    exempt: frozenset[str],
    max_bytes: int,
    last_used: dict[str, float],
) -> list[Image]:
    """Idle, non-exempt images to remove, least recently used first, until the
    total would be under ``max_bytes``."""
    images = list(images)
    total = sum(i.size for i in images)
    candidates = [
        i for i in images if not busy(i) and not exempt.intersection(normalise(t) for t in i.tags)
    ]
    candidates.sort(key=lambda i: last_used.get(i.id, i.created))
    out: list[Image] = []
    for image in candidates:
        if total < max_bytes:
            break
        out.append(image)
        total -= image.size
    return out


class ImageCleaner:
    def __init__(
        self,
        api: DockerAPI,
        max_bytes: int,
        exempt: frozenset[str],
        in_use: Callable[[], Iterable[str]],
        on_removed: Callable[[Image], None],
    ) -> None:
        self.api = api
        self.max_bytes = max_bytes
        self.exempt = exempt
        self._in_use = in_use  # image references of this worker's live containers
        self._on_removed = on_removed
        self._last_used: dict[str, float] = {}
        self.removed = 0

    async def run(self) -> None:
        """Sweep until cancelled; a failed sweep is logged and the next one tries again."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await self.sweep()
            except (DockerError, KeyError, TypeError, ValueError) as exc:  # engine down, odd answer
                log.warning("image cleaner: %s", exc)

    async def _list(self) -> list[Image]:
        items = await self.api.request("GET", "/images/json") or []
        return [
            Image(
                id=str(item["Id"]),
                size=int(item.get("Size") or 0),
                tags=tuple(t for t in item.get("RepoTags") or () if t != "<none>:<none>"),
                created=float(item.get("Created") or 0),
            )
            for item in items
        ]

    async def sweep(self) -> int:
        """One pass; returns how many images it removed."""
        images = await self._list()
        in_use = {normalise(ref) for ref in self._in_use()}
        busy = {
            i.id for i in images if i.id in in_use or in_use.intersection(map(normalise, i.tags))
        }
        now = time.time()
        for image_id in busy:
            self._last_used[image_id] = now
        removed = 0
        chosen = to_remove(images, lambda i: i.id in busy, self.exempt, self.max_bytes,
                           self._last_used)  # fmt: skip
        for image in chosen:
            if await self._remove(image):
                removed += 1
                await asyncio.sleep(1 / MAX_REMOVALS_PER_S)
        self.removed += removed
        return removed

    async def _remove(self, image: Image) -> bool:
        # By tag, so that an image with several names goes only once all are gone;
        # an untagged image by id. The engine refuses images that containers use.
        refs = image.tags or (image.id,)
        try:
            for ref in refs:
                await self.api.request(
                    "DELETE", f"/images/{image_path(ref)}", timeout_s=REMOVE_TIMEOUT_S
                )
        except DockerError as exc:
            if exc.status == 404:
                return False
            log.info("image cleaner: keeping %s: %s", refs[0], exc)
            return False
        self._last_used.pop(image.id, None)
        log.info("image cleaner: removed %s (%d MB)", refs[0], image.size // (1024 * 1024))
        self._on_removed(image)
        return True
