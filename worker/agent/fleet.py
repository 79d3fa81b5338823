"""The agent's containers: a slot queue per function configuration, each with its
launcher, and the hot containers started for them.

A call's queue is made, with its launcher task, when the first call of its
configuration comes, and dropped by that launcher once it has stayed idle a
while. Containers leave before their idle timeout when their function is
deleted, or read with a newer definition under another slot key
(:meth:`Fleet.definition_read`, or any call's own definition), and when their
image name comes to stand for another image (looked up every ``IMAGE_CHECK_S``):
idle ones at once, busy ones once their call is over.

:class:`Fleet` is a part of :class:`agent.Agent`, which holds its state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from config.domain import Function
from config.errors import AgentError
from config.settings import Settings
from worker.agent.cpu import CpuGauge
from worker.agent.driver import Driver
from worker.agent.evictor import Evictor
from worker.agent.hot import HotContainer
from worker.agent.launcher import Launcher
from worker.agent.pacer import FreezePacer
from worker.agent.resources import ResourceToken, ResourceTracker
from worker.agent.slots import Caller, ContainerState, SlotQueue, slot_key
from worker.agent.tasks import TaskSet

log = logging.getLogger("fnq.agent")

KEY_CACHE_SIZE = 1024  # Function objects whose slot key is remembered
IMAGE_CHECK_S = 2.0  # how often the images of live containers are looked up again


class Fleet:
    """The queues and containers of :class:`agent.Agent`, whose ``__init__`` sets the
    attributes declared here (``loop`` is the agent's own property)."""

    settings: Settings
    driver: Driver
    tracker: ResourceTracker
    evictor: Evictor
    cpu: CpuGauge
    pacer: FreezePacer
    start_turns: asyncio.Semaphore | None
    clock: Callable[[], datetime]
    _queues: dict[str, SlotQueue]
    _keys: dict[int, tuple[Function, str]]
    # the newest definition of each function seen: its updated_at and slot key
    _newest: dict[tuple[str, str], tuple[datetime, str]]
    _launchers: TaskSet
    _containers: TaskSet
    _hot: dict[HotContainer, asyncio.Task[None]]
    _no_waiting: bool  # no call waits any more: no container is started

    if TYPE_CHECKING:

        @property
        def loop(self) -> asyncio.AbstractEventLoop: ...

    # ------------------------------------------------------ queues, launch
    def _slot_key(self, fn: Function) -> str:
        """``slot_key(fn)``, remembered per Function object (callers reuse theirs)."""
        known = self._keys.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.clear()
        key = slot_key(fn)
        self._keys[id(fn)] = (fn, key)  # holding fn keeps its id from being reused
        self._retire_superseded(fn, key)
        return key

    def functions(self) -> set[tuple[str, str]]:
        """The functions (app, name) this agent has containers of."""
        return {(hot.fn.app, hot.fn.name) for hot in self._hot}

    def definition_read(self, app: str, name: str, fn: Function | None) -> None:
        """The registry's definition of function ``app``/``name`` as just read (None: it
        is not registered): the containers of its other definitions leave, and all of
        its containers when it is gone (idle ones at once, busy ones after their call)."""
        if fn is not None:
            self._retire_superseded(fn, slot_key(fn))
            return
        self._newest.pop((app, name), None)
        retired = 0
        for hot in list(self._hot):
            if hot.fn.app == app and hot.fn.name == name and hot.retire_reason is None:
                hot.retire("its function was deleted")
                retired += 1
        if retired:
            log.info("%d container(s) of %s/%s retired: the function was deleted",
                     retired, app, name)  # fmt: skip

    def _retire_superseded(self, fn: Function, key: str) -> None:
        """``fn`` is a definition of its function newer than any seen so far (by its
        ``updated_at``) with another slot key: retire the containers of the function's
        other definitions, idle ones at once, busy ones once their call is over. No
        call of this worker asks for them any more but those that looked the
        function up before the change. (A definition as old as the newest one, or
        older, changes nothing: that of a call that looked it up earlier.)"""
        if fn.updated_at is None:
            return
        ref = (fn.app, fn.name)
        newest = self._newest.get(ref)
        if newest is not None and newest[0] >= fn.updated_at:
            return
        self._newest[ref] = (fn.updated_at, key)
        if newest is None or newest[1] == key:
            return
        retired = 0
        for hot in list(self._hot):
            if (
                hot.queue.key != key
                and hot.fn.app == fn.app
                and hot.fn.name == fn.name
                and hot.retire_reason is None
            ):
                hot.retire("its function's definition changed")
                retired += 1
        if retired:
            log.info("%d container(s) of %s retired: the function's definition changed",
                     retired, fn.ref)  # fmt: skip

    def _queue_for(self, fn: Function) -> SlotQueue:
        key = self._slot_key(fn)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = SlotQueue(key, fn)
            launcher = Launcher(
                queue,
                settings=self.settings,
                tracker=self.tracker,
                evictor=self.evictor,
                start_container=self._start_container,
                drop_queue=self._drop_queue,
                cpu=self.cpu,
                worker_containers=self._hot.__len__,
                in_the_way=lambda: self.driver.containers_in_the_way(
                    starting=self.evictor.starting
                ),
            )
            self._launchers.spawn(launcher.run(), name=f"fnq-launcher-{fn.ref}-{key[:8]}")
        queue.last_used_s = self.loop.time()
        return queue

    def _drop_queue(self, queue: SlotQueue) -> bool:
        if not queue.is_idle():
            return False
        if self._queues.get(queue.key) is queue:
            del self._queues[queue.key]
        return True

    def _start_container(
        self, queue: SlotQueue, token: ResourceToken, owner: Caller | None
    ) -> None:
        if self._no_waiting:  # no call would take it
            token.close()
            queue.move(ContainerState.WAIT, ContainerState.DONE)
            return
        hot = HotContainer(
            queue=queue,
            driver=self.driver,
            settings=self.settings,
            token=token,
            evictor=self.evictor,
            owner=owner,
            on_exit=self._forget_container,
            pacer=self.pacer,
            start_turns=self.start_turns,
            clock=self.clock,
        )
        queue.containers_started += 1
        self._hot[hot] = self._containers.spawn(hot.run(), name=f"fnq-container-{hot.id}")

    def _forget_container(self, hot: HotContainer) -> None:
        self._hot.pop(hot, None)

    # ------------------------------------------------------------- images
    async def _watch_images(self) -> None:
        while True:
            await asyncio.sleep(IMAGE_CHECK_S)
            await self.retire_replaced_images()

    async def retire_replaced_images(self) -> int:
        """Retire the containers made from an image that their function's image name no
        longer stands for (rebuilt under the same tag, or pulled anew): idle ones at
        once, busy ones once their call is over. The calls after them get containers
        of the image the name stands for now. How many were retired."""
        live = [hot for hot in self._hot if hot.container is not None and hot.retire_reason is None]
        if not live:
            return 0
        try:
            now = await self.driver.image_ids({hot.fn.image for hot in live})
        except AgentError as exc:
            log.debug("looking up the images of the containers failed: %s", exc)
            return 0
        retired = 0
        for hot in live:
            assert hot.container is not None
            made_from, current = hot.container.image_id, now.get(hot.fn.image)
            if made_from is None or current is None or made_from == current:
                continue
            hot.retire(f"image {hot.fn.image} now stands for another image")
            retired += 1
            log.info("container %s of %s is retired: image %s was rebuilt or pulled anew",
                     hot.id, hot.fn.ref, hot.fn.image)  # fmt: skip
        return retired
