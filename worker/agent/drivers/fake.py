"""An in-memory driver for fast, deterministic tests of the agent core.

Behaviour is scripted per image with :class:`FakeBehaviour` (start delay or
failure, pause/unpause failure, a removal that waits for a gate, and a
handler per call that answers, hangs,
writes output or kills its container); ``host_room`` caps the containers the
host has room for at once, as the worker's descriptors do. A dispatch ends at
its request's timeout with TimeoutError, as the docker driver's does, or with
NotAccepted once its container has stopped accepting connections
(:meth:`FakeContainer.stop_accepting`); one whose kept-alive connection lapsed
(:meth:`FakeContainer.lapse_connection`) needs room on the host for a new one.
The driver counts what the agent did
(creates, starts, pauses, unpauses, removes, dispatches) and
:meth:`FakeDriver.wait_until` lets a test wait for any condition on it
without sleeping::

    driver = FakeDriver(FakeBehaviour(handler=reply(200, b"hi")))
    await driver.wait_until(lambda: driver.pauses == 1)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from config.domain import frozen_map
from config.errors import AgentError
from worker.agent.driver import (
    CallUsage,
    ContainerSpec,
    DispatchRequest,
    DispatchResult,
    Driver,
    ExitInfo,
    OutputSink,
)
from worker.agent.errors import (
    DispatchError,
    ExchangeBroken,
    FreezeFailed,
    HostShort,
    NotAccepted,
    NotDelivered,
)

Handler = Callable[["FakeContainer", DispatchRequest], Coroutine[Any, Any, DispatchResult]]


def reply(
    status: int = 200,
    body: bytes = b"ok",
    headers: Mapping[str, str] | None = None,
    output: tuple[bytes, ...] = (),
    truncated: bool = False,
) -> Handler:
    """Write ``output`` chunks, then answer with ``status`` and ``body``."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        for chunk in output:
            container.emit(chunk)
        return DispatchResult(status, frozen_map(headers), body, truncated)

    return handle


def hang(output: tuple[bytes, ...] = ()) -> Handler:
    """Never answer (until the call is abandoned)."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        for chunk in output:
            container.emit(chunk)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return handle


def gated(gate: asyncio.Event, then: Handler | None = None) -> Handler:
    """Wait for ``gate``, then behave like ``then`` (default: answer 200)."""
    after = then or reply()

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        await gate.wait()
        return await after(container, request)

    return handle


def die(exit_code: int = 1, oom: bool = False, output: tuple[bytes, ...] = ()) -> Handler:
    """The container's process dies during the call."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        for chunk in output:
            container.emit(chunk)
        container.exit(ExitInfo(exit_code=exit_code, oom_killed=oom))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return handle


def drop_then_die(exit_code: int = 1, after_s: float = 0.05) -> Handler:
    """The connection drops first; the engine reports the exit a moment later."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        loop = asyncio.get_running_loop()
        loop.call_later(after_s, container.exit, ExitInfo(exit_code=exit_code))
        raise DispatchError("the connection to the function was dropped")

    return handle


def hang_up(exited: bool | None, exit_code: int = 1, after_s: float = 0.05) -> Handler:
    """The function closes the connection without an answer; the driver watched its
    process after that and says whether it ``exited`` (then the engine reports the
    exit ``after_s`` later) or lives on (None: the driver does not tell)."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        if exited:
            loop = asyncio.get_running_loop()
            loop.call_later(after_s, container.exit, ExitInfo(exit_code=exit_code))
        raise ExchangeBroken("the connection closed without a response", exited=exited)

    return handle


def fail(error: AgentError) -> Handler:
    """The exchange fails with ``error`` (e.g. a DispatchError)."""

    async def handle(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        raise error

    return handle


@dataclass
class FakeBehaviour:
    handler: Handler = field(default_factory=reply)
    start_delay_s: float = 0.0
    start_gate: asyncio.Event | None = None  # start() waits for it
    remove_gate: asyncio.Event | None = None  # remove() waits for it (a slow engine)
    create_error: AgentError | None = None
    start_error: AgentError | None = None
    pause_error: AgentError | None = None
    unpause_error: AgentError | None = None


class FakeContainer:
    def __init__(self, driver: FakeDriver, spec: ContainerSpec, behaviour: FakeBehaviour):
        self._driver = driver
        self.spec = spec
        self.image_id: str | None = driver.image_id(spec.image)
        self.behaviour = behaviour
        self.state = "created"
        self.exit_info: ExitInfo | None = None
        self._exited = asyncio.Event()
        self._sink: OutputSink | None = None
        self.debug_output: list[bytes] = []
        self.requests: list[DispatchRequest] = []
        self.stats: dict[str, float] = {}  # each dispatch's resource use, however it ends
        self._unseen_exit: ExitInfo | None = None  # see die_unseen
        self._listening = True  # cleared by close_listener
        self._connection_lapsed = False  # see lapse_connection
        self._watched = False  # see die_unseen and close_listener
        self._accepting = asyncio.Event()  # cleared by stop_accepting
        self._accepting.set()
        self.removing = False  # its removal began (and waits for the behaviour's gate)

    @property
    def id(self) -> str:
        return self.spec.id

    def __repr__(self) -> str:
        return f"<FakeContainer {self.id} {self.state}>"

    # -------------------------------------------------- test controls
    def emit(self, chunk: bytes) -> None:
        if self._sink is not None:
            self._sink(chunk)
        else:
            self.debug_output.append(chunk)

    def exit(self, info: ExitInfo) -> None:
        """The process ends (crash, out of memory, kill)."""
        if self.exit_info is None:
            self.exit_info = info
            if self.state != "removed":
                self.state = "exited"
            self._exited.set()
            self._driver._changed()

    def die_unseen(self, info: ExitInfo, *, watched: bool = False) -> None:
        """The process ends and the engine has not reported it yet: the socket takes no
        connection, and the exit is reported as the next dispatch is refused. With
        ``watched``, the driver watches the process: the refusal says it is gone
        (NotDelivered.exited), and the engine's report does not come with it."""
        if self.exit_info is None:
            self.state = "exited"
            self._unseen_exit = info
            self._watched = watched

    def close_listener(self, *, watched: bool = False) -> None:
        """The process lives on and closes its listener: its socket refuses the next
        connections. With ``watched``, the driver watches the process and the refusal
        says it lives on (NotDelivered.exited is False); else it does not tell."""
        self._listening = False
        self._watched = watched

    def stop_accepting(self) -> None:
        """The process lives on and accepts no connection any more: the next dispatch is
        queued in its listener's backlog and ends with NotAccepted at its timeout."""
        self._accepting.clear()

    def lapse_connection(self) -> None:
        """The kept-alive connection to its socket lapsed: the next dispatch makes a new
        one, and fails with HostShort (nothing sent) while the host is full (as many
        live containers as ``host_room``), as one that finds no descriptor left."""
        self._connection_lapsed = True

    # ------------------------------------------------------ Container
    async def start(self) -> None:
        self._driver.starts += 1
        self._driver._changed()
        if self.behaviour.start_gate is not None:
            await self.behaviour.start_gate.wait()
        if self.behaviour.start_delay_s:
            await asyncio.sleep(self.behaviour.start_delay_s)
        if self.behaviour.start_error is not None:
            self.exit(ExitInfo(exit_code=1))
            raise self.behaviour.start_error
        self.state = "running"
        self._driver._changed()

    async def dispatch(
        self,
        request: DispatchRequest,
        sink: OutputSink | None = None,
        usage: CallUsage | None = None,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> DispatchResult:
        if self.state != "running":  # its socket takes no connection
            if self._watched:  # the driver saw the process gone; the engine has not told
                raise NotDelivered(f"container {self.id} is {self.state}", exited=True)
            unseen, self._unseen_exit = self._unseen_exit, None
            if unseen is not None:
                self.exit(unseen)
            raise NotDelivered(f"container {self.id} is {self.state}")
        if not self._listening:
            raise NotDelivered(
                f"container {self.id} refused the connection",
                exited=False if self._watched else None,
            )
        if self._connection_lapsed:
            room = self._driver.host_room
            if room is not None and len(self._driver.live) >= room:
                self._driver.connections_refused += 1
                self._driver._changed()
                raise HostShort(f"the fake host has no room for a connection to {self.id}")
            self._connection_lapsed = False
        if on_delivered is not None:
            on_delivered()
        self._sink = sink
        accepted = self._accepting.is_set()
        try:
            async with asyncio.timeout(request.timeout_s):
                if not accepted:
                    await self._accepting.wait()
                    accepted = True
                return await self._dispatch(request)
        except TimeoutError:
            if accepted:
                raise
            raise NotAccepted("the connection waited in the function's listener backlog") from None
        finally:
            self._sink = None
            if usage is not None:
                usage.stats = dict(self.stats)

    async def _dispatch(self, request: DispatchRequest) -> DispatchResult:
        self._driver.dispatches += 1
        self.requests.append(request)
        self._driver._changed()
        handling = asyncio.create_task(
            self.behaviour.handler(self, request), name=f"fake-handler-{request.call_id}"
        )
        exited = asyncio.create_task(self._exited.wait(), name=f"fake-exit-{request.call_id}")
        try:
            await asyncio.wait({handling, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not handling.done():
                handling.cancel()
            exited.cancel()
            await asyncio.gather(handling, exited, return_exceptions=True)
        if handling.done() and not handling.cancelled():
            return handling.result()
        raise DispatchError("the connection to the function was dropped")

    async def pause(self) -> None:
        if self.behaviour.pause_error is not None:
            raise self.behaviour.pause_error
        if self.state != "running":
            raise FreezeFailed(f"cannot pause a container that is {self.state}")
        self.state = "paused"
        self._driver.pauses += 1
        self._driver.paused_at.append(asyncio.get_running_loop().time())
        self._driver._changed()

    async def unpause(self) -> None:
        if self.behaviour.unpause_error is not None:
            raise self.behaviour.unpause_error
        if self.state != "paused":
            raise FreezeFailed(f"cannot unpause a container that is {self.state}")
        self.state = "running"
        self._driver.unpauses += 1
        self._driver._changed()

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit_info is not None
        return self.exit_info

    async def remove(self) -> None:
        if self.state == "removed":
            return
        self.removing = True
        gate = self.behaviour.remove_gate
        if gate is not None:
            self._driver._changed()
            await gate.wait()
            if self.state == "removed":
                return
        self.state = "removed"
        self._driver.removes += 1
        self.exit(ExitInfo(exit_code=137, error="removed"))
        self._driver._changed()


class FakeDriver:
    def __init__(
        self,
        behaviour: FakeBehaviour | None = None,
        per_image: Mapping[str, FakeBehaviour] | None = None,
        host_room: int | None = None,
    ) -> None:
        self.default = behaviour or FakeBehaviour()
        # the containers the host has room for at once (None: any number); a create
        # beyond them fails as the host's shortage (descriptors, say)
        self.host_room = host_room
        self.per_image = dict(per_image or {})
        self.containers: list[FakeContainer] = []
        self.creates = self.starts = self.pauses = self.unpauses = 0
        self.removes = self.dispatches = 0
        self.connections_refused = 0  # new connections the full host had no room for
        self.placements: list[frozenset[int] | None] = []  # each place() asked for
        self.paused_at: list[float] = []  # loop times of the pauses
        self.started = self.closed = False
        # the image id each image name stands for (test control; default: one per name)
        self.images: dict[str, str] = {}
        self._change = asyncio.Event()

    def image_id(self, image: str) -> str:
        return self.images.get(image, f"id-of-{image}")

    def behaviour(self, image: str) -> FakeBehaviour:
        return self.per_image.get(image, self.default)

    @property
    def live(self) -> list[FakeContainer]:
        return [c for c in self.containers if c.state != "removed"]

    def _changed(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()

    async def wait_until(
        self, predicate: Callable[[], bool], timeout_s: float = 5.0, recheck_s: float = 0.01
    ) -> None:
        """Return once ``predicate()`` holds.

        It is checked after every change of a fake container, and every
        ``recheck_s`` for conditions on the agent's own state.
        """
        async with asyncio.timeout(timeout_s):
            while not predicate():
                try:
                    async with asyncio.timeout(recheck_s):
                        await self._change.wait()
                except TimeoutError:
                    pass

    # --------------------------------------------------------- Driver
    async def start(self) -> None:
        self.started = True

    def containers_in_the_way(self, *, connection: bool = False, starting: int = 0) -> int:
        """Live containers beyond the host's room for one more; with ``starting`` ones,
        those made already counted once (a new connection counts none of them)."""
        if self.host_room is None:
            return 0
        if connection:
            return max(0, len(self.live) + 1 - self.host_room)
        made = sum(1 for c in self.live if c.state == "created")
        return max(0, len(self.live) - min(made, starting) + starting + 1 - self.host_room)

    async def create(self, spec: ContainerSpec) -> FakeContainer:
        behaviour = self.behaviour(spec.image)
        self.creates += 1
        self._changed()
        if behaviour.create_error is not None:
            raise behaviour.create_error
        if self.host_room is not None and len(self.live) >= self.host_room:
            raise HostShort(f"the fake host has room for {self.host_room} container(s)")
        container = FakeContainer(self, spec, behaviour)
        self.containers.append(container)
        return container

    async def image_ids(self, images: Collection[str]) -> dict[str, str]:
        return {image: self.image_id(image) for image in images}

    async def place(self, cpus: frozenset[int] | None) -> None:
        self.placements.append(cpus)

    async def close(self) -> None:
        for container in self.containers:
            await container.remove()
        self.closed = True


if TYPE_CHECKING:
    _conforms: Driver = FakeDriver()
