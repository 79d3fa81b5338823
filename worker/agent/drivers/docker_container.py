"""One hot container of the docker driver (implements ``driver.Container``).

Per container the worker holds: the read ends of its output pipes when its
command is wrapped (drivers.pipes), the attach stream (its frames go straight
into the :class:`OutputRouter`), a long-poll ``wait`` (a task resolves
``wait()``), and once ready a pidfd of its first process (drivers.process)
and an :class:`FdkClient` on the host side of its socket. A call costs no
engine request at all: only pause and unpause talk to docker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from worker.agent.driver import (
    SOCKET_NAME,
    CallUsage,
    ContainerSpec,
    DispatchRequest,
    DispatchResult,
    ExitInfo,
    OutputSink,
)
from worker.agent.drivers.cgroup import CgroupMeter
from worker.agent.drivers.docker_api import AttachStream, DockerAPI, DockerError
from worker.agent.drivers.output import OutputRouter, Segment
from worker.agent.drivers.pipes import OutputPipes
from worker.agent.drivers.process import ProcessWatch
from worker.agent.drivers.shortage import ShortageLog
from worker.agent.drivers.stdio import ProcessStdio
from worker.agent.errors import (
    ContainerInitFailed,
    ContainerInitTimeout,
    DispatchError,
    ExchangeBroken,
    FreezeFailed,
    HostShort,
    InvalidResponse,
    NotAccepted,
    NotDelivered,
    ResponseTooBig,
    host_short,
    shortage,
)
from worker.agent.fdk import FdkClient
from worker.agent.iofs import IofsDir, IofsRoot, SocketWatcher, open_listener

log = logging.getLogger("fnq.agent.docker")
function_log = logging.getLogger("fnq.function")

FREEZE_TIMEOUT_S = 5.0
REMOVE_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 5.0  # for the output and wait tasks to notice a removed container
EXIT_OUTPUT_S = 0.5  # a broken exchange: how long the output waits for a death
EXIT_GRACE_S = 0.1  # a broken exchange or a refused connection: how long a process
# that lives on gets to exit
# Dispatch errors that are no broken connection: nothing sent, or a bad answer.
NOT_A_BREAK = (NotDelivered, InvalidResponse, ResponseTooBig)
# The exit wait's connection closes with the answer instead of staying in the session's
# pool: its descriptor goes with the container (many containers leaving at once would
# otherwise leave as many idle connections, held for the pool's keep-alive time).
CLOSE_AFTER = {"Connection": "close"}
# The engine's answer to a pause or unpause the container needs no more (409 or 500).
_ALREADY = {"pause": "is already paused", "unpause": "is not paused"}


@dataclass(frozen=True, slots=True)
class OutputTiming:
    """How long dispatch waits for output still on its way (see drivers.output)."""

    barrier_limit_s: float = 0.5  # for the marker to come back
    quiet_s: float = 0.002  # fallback: this much silence ends the call's output
    limit_s: float = 0.1  # fallback: at most this long
    use_pipes: bool = True  # read the output from pipes of its own (drivers.pipes)
    use_barrier: bool = True  # else mark it in the engine's stream (drivers.stdio)


class DockerContainer:
    def __init__(
        self,
        *,
        api: DockerAPI,
        settings: Settings,
        spec: ContainerSpec,
        iofs: IofsDir,
        iofs_root: IofsRoot,
        timing: OutputTiming,
        on_removed: Callable[[DockerContainer], None],
        direct_output: bool = False,
        shortage_log: ShortageLog | None = None,
    ) -> None:
        self.spec = spec
        self.image_id: str | None = None  # the image it is made from (set by the driver)
        self.iofs = iofs
        self._api = api
        self._settings = settings
        self._iofs_root = iofs_root
        self._timing = timing
        self._on_removed = on_removed
        logger = None if settings.disable_debug_user_logs else function_log
        self._output = OutputRouter(logger, f"{spec.app}/{spec.fn} {spec.id}")
        # direct_output: the command is wrapped and writes to pipes in the iofs directory.
        self._pipes = OutputPipes(iofs.host_path, self._output.feed) if direct_output else None
        self._exit: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._attach: AttachStream | None = None
        self._wait_task: asyncio.Task[None] | None = None
        self._removal: asyncio.Task[None] | None = None
        self._fdk: FdkClient | None = None
        self._stdio: ProcessStdio | None = None
        self._meter: CgroupMeter | None = None
        self._process: ProcessWatch | None = None  # the container's first process
        self._paused = False
        self.network: str | None = None  # the docker network it holds a place in
        self._shortage = shortage_log  # the driver's: a spell of shortage on the host
        self._unwatched: HostShort | None = None  # its exit could not be watched: why

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def connections_made(self) -> int:
        """Connections opened to the function's socket so far (1 while keep-alive holds)."""
        return 0 if self._fdk is None else self._fdk.connections_made

    @property
    def direct_output(self) -> bool:
        """Whether the output is read from pipes of its own (drivers.pipes)."""
        return self._pipes is not None

    def engine_output(self) -> None:
        """Before the start: read the output through the engine (the image has no shell)."""
        self._pipes = None

    @property
    def exact_output(self) -> bool:
        """Whether calls' output is cut exactly (own pipes or markers; else quiet time)."""
        return self._stdio is not None or (self._pipes is not None and self._pipes.open)

    @property
    def removed(self) -> bool:
        return self._removal is not None and self._removal.done()

    # -------------------------------------------------------------- start

    async def start(self) -> None:
        """Start the container and wait for its socket. HostShort when the worker's host
        is short of what it takes (descriptors, say): not the function's fault."""
        try:
            await self._start()
        except Exception as exc:
            short = exc if isinstance(exc, HostShort) else host_short(exc, "starting a container")
            if short is None:
                raise
            if self._shortage is not None:
                self._shortage.failed(short)
            if short is exc:
                raise
            raise short from exc
        if self._shortage is not None:
            self._shortage.worked()

    async def _start(self) -> None:
        timeout_s = self._settings.hot_start_timeout_msecs / 1000.0
        with SocketWatcher(self.iofs.host_path) as watcher:
            if self._pipes is not None:
                try:
                    self._pipes.start()  # before the shell opens them, or it would wait
                except OSError as exc:
                    if shortage(exc) is not None:
                        raise
                    raise ContainerInitFailed(f"cannot read the output pipes: {exc}") from exc
            self._attach = await self._api.attach(self.id, self._output.feed)
            self._attach.ended.add_done_callback(lambda _: self._output_over())
            try:
                await self._api.request("POST", f"/containers/{self.id}/start")
            except DockerError as exc:
                if exc.status is None:
                    raise
                raise ContainerInitFailed(f"container failed to start: {exc}") from exc
            self._wait_task = asyncio.create_task(self._watch_exit(), name=f"fnq-wait-{self.id}")
            await self._until_ready(watcher, timeout_s)
        pid, engine_id = await self._pid()
        if pid:
            # Its exit lets go of the output pipes held (see _release_stdio), and tells a
            # dying function from one that lives on after a broken exchange.
            self._process = ProcessWatch.open(pid, engine_id, self._release_stdio)
            if self._timing.use_barrier and self._pipes is None:
                self._stdio = self._probe_stdio(pid)
            self._meter = CgroupMeter.open(pid)
        self._fdk = FdkClient(
            str(self.iofs.socket_path),
            max_response_bytes=self._settings.max_response_size,
            max_header_bytes=self._settings.max_hdr_response_size,
            opener=functools.partial(open_listener, self.iofs.host_path),
        )

    async def _until_ready(self, watcher: SocketWatcher, timeout_s: float) -> None:
        ready = asyncio.create_task(watcher.ready(), name=f"fnq-ready-{self.id}")
        try:
            waiting: set[asyncio.Future[Any]] = {ready, self._exit}
            done, _ = await asyncio.wait(
                waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not ready.done():
                ready.cancel()
        if ready in done:
            ready.result()  # ContainerInitFailed for a bad socket
            return
        if self._exit.done():
            if self._unwatched is not None:  # not an exit: the worker could not watch it
                raise self._unwatched
            await self._output.settle(self._timing.quiet_s, self._timing.limit_s)
            info = self._exit.result()
            raise ContainerInitFailed(
                f"{info.describe(self.spec.memory_mb)} before it was ready{self._last_output()}"
            )
        raise ContainerInitTimeout(
            f"container did not create {SOCKET_NAME} within {timeout_s:g}s of starting"
            f"{self._last_output()}"
        )

    async def _pid(self) -> tuple[int, str]:
        """The host pid of the container's first process (0 if unknown), and the engine's
        full id of the container."""
        try:
            state = await self._api.request("GET", f"/containers/{self.id}/json")
            return max(0, int(state["State"]["Pid"])), str(state.get("Id") or "")
        except (DockerError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.debug("no pid for %s: %s", self.id, exc)
            return 0, ""

    def _probe_stdio(self, pid: int) -> ProcessStdio | None:
        """The container's output pipes, if this worker can write into them."""
        stdio = ProcessStdio(pid)
        if not stdio.probe():  # a few syscalls on /proc: no thread needed
            log.debug("cannot reach the output pipes of %s; falling back to quiet time", self.id)
            return None
        return stdio

    def _last_output(self) -> str:
        if self._pipes is not None:
            self._pipes.drain()
        tail = self._output.tail()
        return f"; last output: {tail}" if tail else ""

    async def _watch_exit(self) -> None:
        """Long-poll the engine until the container stops (cancelled by remove)."""
        try:
            # No timeout: this lasts as long as the container; remove() ends it.
            answer = await self._api.request(
                "POST", f"/containers/{self.id}/wait", timeout_s=None, headers=CLOSE_AFTER
            )
            code = int(answer["StatusCode"]) if answer else None
        except DockerError as exc:
            self._unwatched = host_short(exc, "watching a container")
            self._release_stdio()
            self._set_exit(ExitInfo(None, error=str(exc)))
            return
        self._release_stdio()
        self._close_pipes()  # the function is gone: its last output is in them
        if self._meter is not None:
            self._meter.close()
        oom = False
        try:
            state = await self._api.request("GET", f"/containers/{self.id}/json")
            oom = bool(state["State"]["OOMKilled"])
        except DockerError as exc:
            log.debug("inspect after exit of %s failed: %s", self.id, exc)
        self._set_exit(ExitInfo(code, oom_killed=oom))

    def _output_over(self) -> None:
        """The attach stream ended: the container's processes are gone."""
        self._close_pipes()
        self._output.end()

    def _close_pipes(self) -> None:
        if self._pipes is not None:
            self._pipes.close()

    def _set_exit(self, info: ExitInfo) -> None:
        if not self._exit.done():
            self._exit.set_result(info)

    # ----------------------------------------------------------- serving

    async def dispatch(
        self,
        request: DispatchRequest,
        sink: OutputSink | None = None,
        usage: CallUsage | None = None,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> DispatchResult:
        if self._fdk is None:
            raise DispatchError(f"container {self.id} is not started")
        output = self._output
        segment = output.open(sink)
        meter = self._meter
        if meter is not None:
            meter.call_started()
        connections = self._fdk.connections_made
        try:
            result = await self._fdk.call(request, on_delivered)
        except HostShort as exc:  # no connection for want of descriptors: nothing was sent
            _read_usage(meter, usage)
            output.drop(segment)
            if self._shortage is not None:
                self._shortage.failed(exc)
            raise
        except asyncio.CancelledError:  # a timeout or a stop: read before it is killed
            _read_usage(meter, usage)
            output.drop(segment)
            raise
        except (DispatchError, TimeoutError) as exc:
            # At once: the cgroup of a container that died goes with it.
            _read_usage(meter, usage)
            told = await self._failed(exc, segment)
            if told is None:
                raise
            raise told from exc
        if self._shortage is not None and self._fdk.connections_made != connections:
            self._shortage.worked()  # a connection was made: the host had a descriptor
        if self._pipes is not None and self._pipes.open:
            self._pipes.drain()  # all it wrote before answering is in the pipes now
            output.drop(segment)
        elif not output.seal(segment, self._stdio, self._timing.barrier_limit_s):
            await output.settle(self._timing.quiet_s, self._timing.limit_s)
            output.drop(segment)
        _read_usage(meter, usage)
        return DispatchResult(
            result.status,
            result.headers,
            result.body,
            result.truncated,
            output_done=segment.sealed,
        )

    async def _failed(
        self, exc: DispatchError | TimeoutError, segment: Segment
    ) -> DispatchError | None:
        """A dispatch failed with ``exc``: the call's output until now is taken, and
        the error that says whether the process exited (ExchangeBroken for a broken
        exchange, NotDelivered for a refused connection) is made; None: ``exc`` as
        it is."""
        # The container may be dying or is about to be killed: let go of its pipes so
        # that the engine sees its output end (drivers.stdio), and take what it wrote
        # until now.
        self._release_stdio()
        broken = isinstance(exc, DispatchError) and not isinstance(exc, NOT_A_BREAK)
        refused = isinstance(exc, NotDelivered) and not isinstance(exc, NotAccepted)
        exited = None
        if broken:
            exited = await self._after_break()
        elif refused:
            exited = await self._after_refusal()
        if self._pipes is not None and self._pipes.open:
            self._pipes.drain()
        else:
            await self._output.settle(self._timing.quiet_s, self._timing.limit_s)
        self._output.drop(segment)
        if broken:
            return ExchangeBroken(str(exc), exited=exited)
        if refused and exited is not None:
            return NotDelivered(str(exc), exited=exited)
        return None

    async def _after_break(self) -> bool:
        """Whether the container's process exited after its exchange broke.

        A process that dies mid-call has most often closed its connection (its
        ``finally`` blocks, deferred closes) before it wrote why: the reason
        comes after the broken exchange, and belongs to the call's log. So the
        call waits for the exit, and then for the engine's report of it and the
        end of the output (up to EXIT_OUTPUT_S). With a watch on the process
        (drivers.process) a process still alive EXIT_GRACE_S after the break
        lives on: the call fails at once. Without one, only the engine tells,
        and the wait for its report lasts up to EXIT_OUTPUT_S.
        """
        process = self._process
        if process is not None and not process.gone.done() and not self._exit.done():
            try:
                async with asyncio.timeout(EXIT_GRACE_S):
                    await asyncio.shield(process.gone)
            except TimeoutError:
                return False  # it broke the exchange and lives on
        await self._until_exit_output(EXIT_OUTPUT_S)
        return self._exit.done() or (process is not None and process.gone.done())

    async def _after_refusal(self) -> bool | None:
        """Whether the container's process is gone, its socket having taken no
        connection; None without a watch on the process (drivers.process).

        A process gone by now was dead before the call: the call may go to
        another container. One that refuses while it lives has closed its
        listener; or it is dying, and closed it on the way out: it gets
        EXIT_GRACE_S to exit, as after a broken exchange. A dead container's
        exit is told at once, without the engine's report of it.
        """
        if self._exit.done():
            return True
        process = self._process
        if process is None:
            return None
        if not process.gone.done():
            try:
                async with asyncio.timeout(EXIT_GRACE_S):
                    await asyncio.shield(process.gone)
            except TimeoutError:
                return self._exit.done()  # it refuses and lives on
        return True

    async def _until_exit_output(self, limit_s: float) -> None:
        """Wait up to ``limit_s`` for the container's exit and the end of its output."""
        ends: list[asyncio.Future[Any]] = [self._exit]
        if self._pipes is None and self._attach is not None:
            ends.append(self._attach.ended)
        try:
            async with asyncio.timeout(limit_s):
                for end in ends:
                    await asyncio.shield(end)
        except TimeoutError:
            pass  # alive: it broke the exchange and lives on

    def _unwatch_process(self) -> None:
        if self._process is not None:
            self._process.close()

    def _release_stdio(self) -> None:
        """Let go of the container's output pipes (drivers.stdio): at once when its first
        process exits (drivers.process), when a call's exchange breaks, and when it
        goes. Held pipes would keep the engine waiting (about 2 s) for the end of the
        container's output before it reports the exit. Without a watch on the
        process the pipes are let go when the engine reports the exit."""
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None

    async def pause(self) -> None:
        await self._freeze("pause")
        self._paused = True

    async def unpause(self) -> None:
        await self._freeze("unpause")
        self._paused = False

    async def _freeze(self, action: str) -> None:
        try:
            await self._api.request(
                "POST", f"/containers/{self.id}/{action}", timeout_s=FREEZE_TIMEOUT_S
            )
        except DockerError as exc:
            if exc.status in (409, 500) and _ALREADY[action] in str(exc):
                # `docker pause` or `docker unpause` from outside did it first: the
                # container is as asked, and nothing is wrong with it.
                log.info("%s of %s: it already was (%s)", action, self.id, exc)
                return
            raise FreezeFailed(f"docker {action} of {self.id} failed: {exc}") from exc

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._exit)

    # ------------------------------------------------------------ removal

    async def remove(self) -> None:
        if self._removal is None:
            self._removal = asyncio.create_task(self._remove(), name=f"fnq-remove-{self.id}")
        await asyncio.shield(self._removal)

    async def _remove(self) -> None:
        try:
            self._unwatch_process()
            self._release_stdio()
            self._close_pipes()
            if self._meter is not None:
                self._meter.close()
            if self._fdk is not None:
                await self._fdk.close()
            if self._paused:
                # The engine's own way of force-removing a paused container (kill, then
                # thaw) races with itself when many go at once, and can leave the engine
                # stuck on one of them: thaw it first, then remove it like any other.
                try:
                    await self._freeze("unpause")
                except FreezeFailed as exc:
                    log.debug("unpausing %s before removal failed: %s", self.id, exc)
            try:
                await self._api.request(
                    "DELETE",
                    f"/containers/{self.id}",
                    params={"force": "1", "v": "1"},
                    timeout_s=REMOVE_TIMEOUT_S,
                )
            except DockerError as exc:
                if exc.status != 404:
                    log.warning("removing container %s failed: %s", self.id, exc)
            if self._attach is not None:
                await asyncio.wait({self._attach.ended}, timeout=DRAIN_TIMEOUT_S)
            await self._stop_task(self._wait_task)
            self._set_exit(ExitInfo(None, error="removed before it exited"))
            await asyncio.to_thread(self._iofs_root.remove, self.iofs)
        finally:
            if self._attach is not None:
                self._attach.close()
            self._on_removed(self)

    @staticmethod
    async def _stop_task(task: asyncio.Task[None] | None) -> None:
        """Give a task a moment to finish on its own (its stream ends), then cancel it."""
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=DRAIN_TIMEOUT_S)
        if not done:
            task.cancel()
            await asyncio.wait({task})

    def describe(self) -> str:
        return f"{self.spec.app}/{self.spec.fn} {self.id} ({self.spec.image})"


def _read_usage(meter: CgroupMeter | None, usage: CallUsage | None) -> None:
    """End the call's reading (each call's memory peak starts where the last ended)
    and hand it to ``usage``."""
    if meter is not None:
        stats = meter.call_ended()
        if usage is not None:
            usage.stats = stats
