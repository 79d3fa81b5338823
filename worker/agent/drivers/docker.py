"""The docker driver (implements ``driver.Driver``).

Talks to the engine over its unix socket with aiohttp (see docker_api), so
nothing blocks the event loop and no thread waits on a container.

* ``start()``: opens the engine session, refuses networks of FN_DOCKER_NETWORKS
  that the engine does not have, removes containers that carry this worker's
  classifier label but were left by a worker that is gone (its process no
  longer runs on this host), loads FN_DOCKER_LOAD_FILE; looks for such
  containers again every ``LEFTOVER_SWEEP_S`` while it runs (see
  docker_leftovers).
* ``create(spec)``: makes sure the image is there (docker_images: inspected at
  each create, for the image its name stands for now: a tag rebuilt or pulled
  anew names another; pulled within FN_HOT_PULL_TIMEOUT_MSECS, one pull per
  image however many callers wait), refuses images that declare VOLUME, makes
  the socket directory and creates the container (see docker_config for its
  limits). The container's command is wrapped so that its output goes to pipes
  the worker reads (drivers.pipes); whether the image has ``/bin/sh`` for that
  is asked of the engine on its first container, and remembered (per image id,
  as what the image declares is).
* ``image_ids(images)``: the id each image name stands for now (the agent
  retires containers made from an image that a name no longer stands for).
* ``close()``: removes every container it made that still exists.

With FN_IMAGE_CLEAN_MAX_SIZE set, an image cleaner (drivers.image_cleaner)
runs beside it and removes idle images while they take more than that.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

from config.errors import AgentError, ConfigError
from config.settings import Settings
from worker.agent.cpu_place import cpu_list, online_cpus
from worker.agent.driver import ContainerSpec
from worker.agent.drivers.claim import LeftoverClaims
from worker.agent.drivers.docker_api import DockerAPI, DockerError
from worker.agent.drivers.docker_config import create_body
from worker.agent.drivers.docker_container import DockerContainer, OutputTiming
from worker.agent.drivers.docker_images import DriverImages, ImageFacts
from worker.agent.drivers.docker_leftovers import STRAYS_AT_CLOSE_S, LeftoverSweeps
from worker.agent.drivers.image_cleaner import ImageCleaner, exempt_tags
from worker.agent.drivers.pipes import SHELL, make_pipes, wrapped_command
from worker.agent.drivers.shortage import (
    CONNECTION_DESCRIPTORS,
    CONTAINER_DESCRIPTORS,
    LAUNCH_DESCRIPTORS,
    ShortageLog,
    check_descriptors,
    containers_in_the_way,
)
from worker.agent.errors import AgentClosed, ContainerInitFailed, HostShort, host_short, shortage
from worker.agent.iofs import IofsDir, IofsRoot, check_room

log = logging.getLogger("fnq.agent.docker")

LEFTOVER_START_S = 30.0  # the first look, at start, takes at most this long
CREATE_SETTLE_S = 10.0  # a create whose caller was cancelled gets this long to end


class DockerDriver(LeftoverSweeps, DriverImages):
    def __init__(
        self,
        settings: Settings,
        *,
        socket_path: str | None = None,
        output_timing: OutputTiming | None = None,
    ) -> None:
        self.settings = settings
        self.instance = secrets.token_hex(8)
        self.api = DockerAPI(socket_path)
        self._timing = output_timing or OutputTiming()
        self._iofs = IofsRoot(settings, unprivileged=not settings.disable_unprivileged_containers)
        self._images: dict[str, ImageFacts] = {}  # by image id
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._containers: dict[str, DockerContainer] = {}
        self._network_use: Counter[str] = Counter({n: 0 for n in settings.networks})
        self._started = False
        self._closed = False
        self._cleaner: asyncio.Task[None] | None = None
        self.cleaner: ImageCleaner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._cpuset: str | None = None  # the CPUs of containers made from now on
        # creates given up before the engine answered, and removals of what they made
        self._late_removals: set[asyncio.Future[Any]] = set()
        # starts and connections failing for want of descriptors, disk or memory
        self.shortage = ShortageLog(log)
        self._claims = LeftoverClaims()  # which worker on the host removes a leftover

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.api.open()
        await self.api.request("GET", "/_ping")
        await self._check_networks()
        await asyncio.to_thread(self._iofs.open)
        self._started = True
        try:  # an engine slow to remove them must not hold the worker's start
            async with asyncio.timeout(LEFTOVER_START_S):
                await self.remove_leftovers()
        except TimeoutError:
            log.warning("removing the containers of dead workers took over %g s; the rest go "
                        "in the sweeps that follow", LEFTOVER_START_S)  # fmt: skip
        self._sweeper = asyncio.create_task(self._sweep_leftovers(), name="fnq-leftover-sweep")
        if self.settings.docker_load_file:
            await self._load(Path(self.settings.docker_load_file))
        if self.settings.image_clean_max_size > 0:
            self.cleaner = ImageCleaner(
                self.api,
                self.settings.image_clean_max_size,
                exempt_tags(self.settings.image_clean_exempt_tags),
                in_use=lambda: {c.spec.image for c in self._containers.values()},
                on_removed=self._image_removed,
            )
            self._cleaner = asyncio.create_task(self.cleaner.run(), name="fnq-image-cleaner")

    async def close(self) -> None:
        self._closed = True
        self.shortage.close()
        for task in (self._cleaner, self._sweeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in self._pulls.values():
            task.cancel()
        containers = list(self._containers.values())
        results = await asyncio.gather(*(c.remove() for c in containers), return_exceptions=True)
        for container, result in zip(containers, results, strict=True):
            if isinstance(result, Exception):
                log.warning("removing %s at close failed: %s", container.describe(), result)
        if self._late_removals:  # then the sweep below finds what they made
            await asyncio.wait(set(self._late_removals), timeout=STRAYS_AT_CLOSE_S)
        if self._started:
            await self._remove_strays()
        await self.api.close()
        if self._started:
            await asyncio.to_thread(self._iofs.close)

    async def place(self, cpus: frozenset[int] | None) -> None:
        """New containers on ``cpus`` (None: any), and the live ones moved there (to
        the host's online CPUs for None). A container that cannot be moved (gone, or
        the engine refuses) keeps its CPUs."""
        self._cpuset = None if cpus is None else cpu_list(cpus)
        target = self._cpuset if self._cpuset is not None else online_cpus()
        if not target:
            return
        for container in list(self._containers.values()):
            if container.removed:
                continue
            try:
                await self.api.request(
                    "POST", f"/containers/{container.id}/update", body={"CpusetCpus": target}
                )
            except DockerError as exc:
                log.debug("%s stays on its CPUs: %s", container.describe(), exc)

    def containers_in_the_way(self, *, connection: bool = False, starting: int = 0) -> int:
        """Idle containers that must leave for the host to have room for another beside
        ``starting`` ones: for the worker's file descriptors (LAUNCH_DESCRIPTORS, and
        CONTAINER_DESCRIPTORS for each one starting: drivers.shortage), and one for the
        inodes of its socket directory. ``connection``: for a new connection to a function's socket
        instead (descriptors only)."""
        if not self._started or self._closed:
            return 0
        if connection:
            return containers_in_the_way(CONNECTION_DESCRIPTORS)
        needed = LAUNCH_DESCRIPTORS + CONTAINER_DESCRIPTORS * max(0, starting)
        descriptors = containers_in_the_way(needed)
        return max(descriptors, int(self._iofs.short_of_inodes()))

    @property
    def iofs_base(self) -> Path | None:
        """The directory holding the socket directories (None before start)."""
        return self._iofs.base

    @property
    def containers(self) -> list[DockerContainer]:
        return list(self._containers.values())

    # --------------------------------------------------------------- create

    async def create(self, spec: ContainerSpec) -> DockerContainer:
        if self._closed or not self._started:
            raise AgentClosed("the docker driver is not running")
        try:
            return await self._make(spec)
        except Exception as exc:
            short = self._short(exc, "creating a container")
            if short is None or short is exc:
                raise
            raise short from exc

    def _short(self, exc: BaseException, doing: str) -> HostShort | None:
        """``exc`` as a HostShort (itself if it is one), counted in the spell of
        shortage it belongs to, if it comes of a shortage on the host; else None."""
        short = exc if isinstance(exc, HostShort) else host_short(exc, doing)
        if short is not None:
            self.shortage.failed(short)
        return short

    async def _make(self, spec: ContainerSpec) -> DockerContainer:
        check_descriptors()  # else the engine would make a container that cannot start
        facts = await self._check_image(spec.image)
        direct = self._timing.use_pipes and facts.shell is not False and bool(facts.command)
        iofs, direct = await asyncio.to_thread(self._socket_dir, spec.id, direct)
        network = self._pick_network()
        container = DockerContainer(
            api=self.api,
            settings=self.settings,
            spec=spec,
            iofs=iofs,
            iofs_root=self._iofs,
            timing=self._timing,
            on_removed=self._forget,
            direct_output=direct,
            shortage_log=self.shortage,
        )
        container.network = network
        container.image_id = facts.id
        self._containers[spec.id] = container
        try:
            try:
                await self._create(spec, iofs.docker_path, network, facts, direct)
            except DockerError as exc:
                if exc.status != 404:
                    raise
                # The image went away since it was inspected (e.g. an image cleaner).
                facts = await self._check_image(spec.image)
                container.image_id = facts.id
                await self._create(spec, iofs.docker_path, network, facts, direct)
            if direct and facts.shell is None:
                facts.shell = await self._has_shell(spec.id)
                if not facts.shell:  # the wrapper cannot run: the image's own command
                    log.info("image %s has no %s: its output comes through the engine",
                             spec.image, SHELL)  # fmt: skip
                    await self._delete(spec.id)
                    container.engine_output()
                    await self._create(spec, iofs.docker_path, network, facts, False)
        except BaseException:
            await container.remove()
            raise
        return container

    def _socket_dir(self, name: str, pipes: bool) -> tuple[IofsDir, bool]:
        """A new socket directory, with the output pipes in it if ``pipes`` (and whether
        they are), and room left for the function's socket; in a thread (file-system
        work). HostShort when the host has no room for them."""
        doing = f"making a container's socket directory in {self._iofs.base}"
        try:
            iofs = self._iofs.make(name)
        except OSError as exc:
            short = host_short(exc, doing)
            if short is None:
                raise
            raise short from exc
        try:
            if pipes:
                try:
                    make_pipes(iofs.host_path)
                except OSError as exc:
                    if shortage(exc) is not None:
                        raise
                    log.debug("no output pipes for %s (%s): output through the engine",
                              name, exc)  # fmt: skip
                    pipes = False
            check_room(iofs.host_path)
        except OSError as exc:
            self._iofs.remove(iofs)
            short = host_short(exc, doing)
            if short is None:
                raise
            raise short from exc
        return iofs, pipes

    async def _create(
        self,
        spec: ContainerSpec,
        iofs_docker_path: str,
        network: str | None,
        facts: ImageFacts,
        direct: bool,
    ) -> None:
        body = create_body(
            self.settings,
            spec,
            instance=self.instance,
            iofs_docker_path=iofs_docker_path,
            network=network,
            entrypoint=wrapped_command(facts.command) if direct else None,
            cpuset=self._cpuset,
        )
        post = asyncio.ensure_future(
            self.api.request("POST", "/containers/create", params={"name": spec.id}, body=body)
        )
        try:
            await asyncio.shield(post)
        except asyncio.CancelledError:
            # The engine goes on making the container after its caller stops waiting:
            # let the request end, so that the removal that follows finds it.
            await asyncio.wait({post}, timeout=CREATE_SETTLE_S)
            if post.done():
                if not post.cancelled():
                    post.exception()  # retrieved: an error here is the caller's no more
            else:  # a slow engine: whatever it makes once this is over goes at once
                post.add_done_callback(functools.partial(self._made_too_late, spec.id))
                self._late_removals.add(post)
                post.add_done_callback(self._late_removals.discard)
            raise
        except DockerError as exc:
            if exc.status is None or exc.status == 404 or exc.status >= 500:
                raise
            raise ContainerInitFailed(f"docker refused to create the container: {exc}") from exc

    def _made_too_late(self, name: str, post: asyncio.Future[Any]) -> None:
        """A create whose caller gave up before the engine answered has ended."""
        if post.cancelled() or post.exception() is not None or self._closed:
            return  # nothing made; or the sweep at close removes it
        task = asyncio.ensure_future(self._delete_quietly(name))
        self._late_removals.add(task)
        task.add_done_callback(self._late_removals.discard)

    async def _delete_quietly(self, container_id: str) -> None:
        try:
            await self._delete(container_id)
        except AgentError as exc:
            if not (isinstance(exc, DockerError) and exc.status == 404):
                log.warning("could not remove container %s: %s", container_id, exc)

    async def _has_shell(self, container_id: str) -> bool:
        """Whether the (created, not started) container's file system has /bin/sh."""
        try:
            await self.api.request(
                "HEAD", f"/containers/{container_id}/archive", params={"path": SHELL}
            )
        except DockerError as exc:
            if exc.status is None:
                raise
            return False  # 404: no such file (or an engine that cannot tell)
        return True

    async def _check_networks(self) -> None:
        """ConfigError naming the networks of FN_DOCKER_NETWORKS the engine does not have:
        every container given one would fail to start."""
        missing = []
        for network in self._network_use:
            try:
                await self.api.request("GET", f"/networks/{quote(network, safe='')}")
            except DockerError as exc:
                if exc.status != 404:
                    raise
                missing.append(network)
        if missing:
            noun = "network" if len(missing) == 1 else "networks"
            raise ConfigError(
                f"FN_DOCKER_NETWORKS: the docker engine has no {noun} {', '.join(missing)} "
                "(`docker network ls` lists its networks)"
            )

    def _pick_network(self) -> str | None:
        if not self._network_use:
            return None
        network = min(self._network_use, key=lambda n: self._network_use[n])
        self._network_use[network] += 1
        return network

    def _forget(self, container: DockerContainer) -> None:
        self._containers.pop(container.id, None)
        network = container.network
        if network is not None and self._network_use[network] > 0:
            self._network_use[network] -= 1
            container.network = None
