"""The seam between the agent core and a container engine.

The agent core decides *when* a container starts, serves a call, pauses and
goes away; a :class:`Driver` knows *how*. A driver makes :class:`Container`
objects, each of which, once started, speaks the FDK hot-function contract:
one HTTP request at a time over the unix socket it created.

Lifecycle of one container, as the agent core drives it::

    c = await driver.create(spec)           # image checked/pulled, container created
    await c.start()                         # attached, started, socket ready
    usage = CallUsage()
    result = await c.dispatch(req, sink, usage)
                                            # POST /call; output to sink, use to usage
    await result.output_done                # ... until all written before the answer is in
    await c.pause(); await c.unpause()      # while idle
    await c.remove()                        # always, exactly once in effect

The next call may be dispatched before ``output_done`` resolves: each call's
output is cut exactly where its answer was, whatever the order in which the
pieces arrive.

``wait()`` resolves whenever the container exits, for whatever reason, and may
be awaited by several tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from config.domain import frozen_map

# Output callback: gets raw chunks of the container's stdout and stderr.
OutputSink = Callable[[bytes], None]

# The socket contract, fixed by the FDKs.
IOFS_MOUNT = "/tmp/iofs"  # inside the container, fixed by the FDK contract
SOCKET_NAME = "lsnr.sock"
FN_LISTENER = f"unix:{IOFS_MOUNT}/{SOCKET_NAME}"


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to create one hot container of a function."""

    id: str  # also the container's name
    image: str
    app: str
    fn: str
    env: Mapping[str, str] = field(default_factory=frozen_map)
    memory_mb: int = 128
    cpus_mcpu: int = 0
    tmpfs_mb: int = 0


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    call_id: str
    body: bytes
    headers: Mapping[str, str]
    deadline: datetime
    timeout_s: float


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """The FDK's raw answer; the agent core maps the status to an outcome."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool = False
    # Resolves once the output written before the answer has reached the call's
    # sink (None: it already has).
    output_done: asyncio.Future[None] | None = None


@dataclass(slots=True)
class CallUsage:
    """Filled in by :meth:`Container.dispatch` when the dispatch ends, however it
    ends (an answer, an error, a timeout's cancellation): the call's resource use,
    read as it ended (a container killed for its memory has its peak there); empty
    when not known."""

    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExitInfo:
    exit_code: int | None
    oom_killed: bool = False
    error: str | None = None

    def describe(self, memory_mb: int | None = None) -> str:
        if self.oom_killed:
            limit = f" (limit {memory_mb} MB)" if memory_mb else ""
            return f"container was killed: out of memory{limit}"
        if self.error:
            return f"container stopped: {self.error}"
        if self.exit_code == 137:  # SIGKILL, and the engine saw no OOM: `docker kill`, say
            return "container was killed (exit code 137)"
        return f"container exited with code {self.exit_code}"


class Container(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def image_id(self) -> str | None:
        """The id of the image the container was made from (None: not known)."""

    async def start(self) -> None:
        """Attach output, start, and return once the socket is ready.

        Raises ContainerInitFailed (exited, bad socket or symlink) or
        ContainerInitTimeout (no socket within the start timeout).
        """

    async def dispatch(
        self,
        request: DispatchRequest,
        sink: OutputSink | None = None,
        usage: CallUsage | None = None,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> DispatchResult:
        """One POST /call; the output goes to ``sink`` (None: the debug log) until
        ``result.output_done``, the call's resource use to ``usage``.
        ``on_delivered`` is called once the function's socket has taken the
        connection, before the request is written: from then on the call has
        reached the function (NotDelivered comes before it, never after), unless
        the function never accepts that connection: then NotAccepted comes at the
        request's timeout. Raises DispatchError (or a subclass: ExchangeBroken for
        a connection that broke mid-call, saying whether the process exited if the
        driver watched it) or TimeoutError at the request's timeout, once the
        output until then has been taken."""

    async def pause(self) -> None: ...

    async def unpause(self) -> None: ...

    async def wait(self) -> ExitInfo:
        """Resolve when the container has exited."""

    async def remove(self) -> None:
        """Kill and remove the container and its socket directory; idempotent."""


class Driver(Protocol):
    async def start(self) -> None:
        """Connect; remove leftovers of dead workers; load FN_DOCKER_LOAD_FILE."""

    async def create(self, spec: ContainerSpec) -> Container:
        """Ensure the image (ImageNotFound, ImageHasVolume, ImagePullTimeout), create."""

    async def image_ids(self, images: Collection[str]) -> dict[str, str]:
        """The id of the image each reference names now; references the engine cannot
        tell (no such image, an engine error) are left out."""

    async def place(self, cpus: frozenset[int] | None) -> None:
        """Run containers made from now on, and move the live ones, on ``cpus``
        (None: on any CPU of the host)."""

    def containers_in_the_way(self, *, connection: bool = False, starting: int = 0) -> int:
        """How many idle containers must leave before the host has room to start one
        more (the worker's file descriptors, inodes for the socket directories): 0
        when it has room. Cheap: asked before each launch. ``starting``: containers
        launched and not up yet, each counted as taking all a start takes (some
        of which it may hold already). ``connection``: room for a new connection
        to a started container's socket instead (descriptors; ``starting`` is not
        counted)."""

    async def close(self) -> None:
        """Remove every container this driver made that still exists."""
