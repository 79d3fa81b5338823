"""Which worker removes a container that a dead worker left, when several sweep at once.

Workers on one host look for the containers of dead workers every few seconds
(drivers.docker), often at the same moment. The engine does not tell them
apart: a removal that reaches it while another removal of the same container
is ending is answered as done too, though it removed nothing. So before it
removes a leftover, a worker claims it by renaming it to a name every worker
derives from the container's id (:func:`claim_name`). The engine renames one
container at a time and never to the name it has already: of workers that
claim it at once, one rename works and the others are refused ("the same name
as its current name"), or find it gone. Only the worker whose rename worked
removes it, and counts it.

A leftover found bearing its claim name is being removed by the worker that
claimed it, and is left to it; if it still bears that name at this worker's
next sweep, that worker is taken as gone (it died between its claim and its
removal, or the removal failed), and the leftover is removed like any other.
"""

from __future__ import annotations

from typing import Any

from worker.agent.drivers.docker_api import DockerAPI, DockerError

CLAIM_PREFIX = "fnq-removing-"


def claim_name(container_id: str) -> str:
    """The name a leftover is renamed to by the worker that removes it."""
    return f"{CLAIM_PREFIX}{container_id[:32]}"


def _names(item: dict[str, Any]) -> list[str]:
    return [str(name).lstrip("/") for name in item.get("Names") or []]


class LeftoverClaims:
    """The claims of one worker's sweeps for leftovers."""

    def __init__(self) -> None:
        self._seen: set[str] = set()  # leftovers seen claimed by others, last sweep
        self._seeing: set[str] = set()  # and in this one

    def new_sweep(self) -> None:
        """A sweep begins: what the last one saw claimed is what this one compares to."""
        self._seen, self._seeing = self._seeing, set()

    async def take(self, api: DockerAPI, item: dict[str, Any]) -> bool:
        """Claim the listed leftover ``item`` for this worker to remove; whether this
        worker removes it (False: another worker does, or it is gone)."""
        container_id = str(item["Id"])
        claim = claim_name(container_id)
        if claim in _names(item):  # claimed by another sweep
            if container_id in self._seen:
                return True  # and still there a sweep later: abandoned
            self._seeing.add(container_id)
            return False
        try:
            await api.request("POST", f"/containers/{container_id}/rename", params={"name": claim})
        except DockerError as exc:
            # Gone, claimed by another worker meanwhile (renamed already: "the same
            # name as its current name"), or being removed: left to that worker.
            if exc.status in (400, 404, 409):
                return False
            if exc.status is None:
                raise  # no answer from the engine: the sweep fails, the next one tries
            return True  # the engine renames no such container: it goes unclaimed
        return True
