"""What workers that are gone left on the engine, and the docker driver's sweeps
for it (a part of :class:`docker.DockerDriver`).

With ``FN_CONTAINER_LABEL_TAG`` set, every container the driver makes carries
that classifier label, its worker's instance and its owner (host name and
pid). A sweep, at start and every ``LEFTOVER_SWEEP_S`` after, force-removes
the labelled containers of workers whose process no longer runs on this host
(and their socket directories, when those are plain host paths), and this
worker's own containers that it lost track of (a removal that failed, a
create given up before the engine answered); at close the driver looks for
the latter once more. Containers of live workers, and of workers on other
hosts or in other pid namespaces, are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from config.domain import pid_namespace, process_gone
from config.errors import AgentError, reason_of
from config.settings import Settings
from worker.agent.driver import IOFS_MOUNT
from worker.agent.drivers.claim import LeftoverClaims
from worker.agent.drivers.docker_api import DockerAPI, DockerError
from worker.agent.drivers.docker_config import (
    CLASSIFIER_LABEL,
    INSTANCE_LABEL,
    OWNER_LABEL,
    PIDNS_LABEL,
)
from worker.agent.drivers.docker_container import DockerContainer
from worker.agent.drivers.shortage import ShortageLog
from worker.agent.errors import shortage
from worker.agent.iofs import remove_tree

log = logging.getLogger("fnq.agent.docker")

LEFTOVER_SWEEP_S = 5.0  # how often a live worker looks for containers of dead ones
STRAYS_AT_CLOSE_S = 10.0  # the last look for this worker's own containers, at close


def _gone_or_going(exc: DockerError) -> bool:
    """Whether a failed removal means the container is gone, or being removed."""
    return exc.status == 404 or (exc.status == 409 and "in progress" in str(exc))


def _left_by_dead_worker(labels: dict[str, str], own_instance: str) -> bool:
    """Whether a labelled container belongs to a worker that is gone.

    Containers of a live worker on this host (its pid still runs) are left
    alone, so several workers can share one engine; so are those of workers
    on other hosts, or in another pid namespace on this one (in containers of
    their own that share its host name), whose liveness cannot be told from
    here. (Containers labelled before the namespace was are taken as of this
    one's.)
    """
    if labels.get(INSTANCE_LABEL) == own_instance:
        return False
    owner = labels.get(OWNER_LABEL, "")
    _, _, pid = owner.rpartition(":")
    if not owner or not pid.isdigit():
        return True
    return process_gone(owner, labels.get(PIDNS_LABEL, pid_namespace()))


class LeftoverSweeps:
    """The sweeps of :class:`docker.DockerDriver`, whose ``__init__`` sets the
    attributes declared here."""

    settings: Settings
    api: DockerAPI
    instance: str
    shortage: ShortageLog
    _claims: LeftoverClaims
    _containers: dict[str, DockerContainer]

    async def _sweep_leftovers(self) -> None:
        """Every LEFTOVER_SWEEP_S, remove what workers that died on this host left.

        A worker killed mid-call leaves its containers running that call, while
        the call's message goes to another worker once its reservation lapses.
        Removing them soon keeps the two runs from overlapping for long.
        """
        while True:
            await asyncio.sleep(LEFTOVER_SWEEP_S)
            try:
                async with asyncio.timeout(LEFTOVER_SWEEP_S):
                    await self.remove_leftovers()
            except (AgentError, TimeoutError) as exc:
                # In a spell of shortage on the host (no descriptor to ask the engine
                # with, say), the spell's own lines say enough.
                quiet = self.shortage.short and shortage(exc) is not None
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "looking for containers of dead workers failed: %s", exc)  # fmt: skip

    async def remove_leftovers(self) -> int:
        """Force-remove labelled containers of other (dead) instances, each once claimed
        (drivers.claim); returns how many. Also this worker's own containers that it
        no longer knows of (see _lost)."""
        tag = self.settings.container_label_tag
        if not tag:
            return 0
        filters = json.dumps({"label": [f"{CLASSIFIER_LABEL}={tag}"]})
        listed = await self.api.request(
            "GET", "/containers/json", params={"all": "1", "filters": filters}
        )
        removed = 0
        self._claims.new_sweep()
        for item in listed or []:
            if self._lost(item):
                await self._remove_lost(item["Id"])
                continue
            if not _left_by_dead_worker(item.get("Labels") or {}, self.instance):
                continue
            if not await self._claims.take(self.api, item):
                continue  # another worker's sweep removes it (drivers.claim)
            try:
                await self.api.request(
                    "DELETE", f"/containers/{item['Id']}", params={"force": "1", "v": "1"}
                )
            except DockerError as exc:
                # Gone, or being removed: the sweep of another worker on this host
                # got there first (and counts it).
                if _gone_or_going(exc):
                    continue
                log.warning("could not remove leftover container %s: %s", item["Id"], exc)
                continue
            removed += 1
            await asyncio.to_thread(self._forget_leftover_dir, item)
        if removed:
            log.info("removed %d container(s) left by other fnq workers", removed)
        return removed

    def _lost(self, item: dict[str, Any]) -> bool:
        """Whether a listed container is this worker's own but no longer one it knows:
        its removal failed (the engine did not answer, or the worker had no descriptor
        left to ask it), or the engine made it after its create was given up. Every
        container the worker makes is known by its name before it is asked for."""
        labels = item.get("Labels") or {}
        if labels.get(INSTANCE_LABEL) != self.instance:
            return False
        names = [str(name).lstrip("/") for name in item.get("Names") or []]
        return bool(names) and not any(name in self._containers for name in names)

    async def _remove_lost(self, container_id: str) -> None:
        try:
            await self._delete(container_id)
        except DockerError as exc:
            if not _gone_or_going(exc):
                log.warning("could not remove container %s: %s", container_id[:12], exc)
            return
        log.info("removed container %s, which this worker could not remove before",
                 container_id[:12])  # fmt: skip

    async def _remove_strays(self) -> None:
        """Remove any container with this worker's own label that is still there: one
        the engine made after its creation was given up (a create it was still
        working on when the caller stopped waiting and the removal found nothing)."""
        if not self.settings.container_label_tag:
            return
        filters = json.dumps({"label": [f"{INSTANCE_LABEL}={self.instance}"]})
        try:
            async with asyncio.timeout(STRAYS_AT_CLOSE_S):
                listed = await self.api.request(
                    "GET", "/containers/json", params={"all": "1", "filters": filters}
                )
                for item in listed or []:
                    try:
                        await self._delete(item["Id"])
                    except DockerError as exc:
                        if not _gone_or_going(exc):  # going: a removal that timed out
                            log.warning("could not remove container %s: %s", item["Id"], exc)
                        continue
                    log.info("removed container %s, which this worker made but had lost "
                             "track of", item["Id"][:12])  # fmt: skip
        except (AgentError, TimeoutError) as exc:
            log.warning("looking for this worker's own containers at close failed: %s",
                        reason_of(exc))  # fmt: skip

    def _forget_leftover_dir(self, item: dict[str, Any]) -> None:
        """Remove a dead worker's socket directory when it is a plain host path of ours."""
        if self.settings.iofs_docker_path or self.settings.iofs_tmpfs:
            return
        for mount in item.get("Mounts") or []:
            if mount.get("Destination") != IOFS_MOUNT:
                continue
            source = Path(str(mount.get("Source", "")))
            if source.name.startswith("iofs-") and source.is_dir():
                remove_tree(source)
                if source.parent.name.startswith("fnq-iofs-"):
                    with contextlib.suppress(OSError):
                        source.parent.rmdir()

    async def _delete(self, container_id: str) -> None:
        await self.api.request(
            "DELETE", f"/containers/{container_id}", params={"force": "1", "v": "1"}
        )
