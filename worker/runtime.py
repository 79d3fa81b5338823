"""Open everything a worker needs, run it, and close it all again."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource

from config.settings import Settings, unknown_env_names
from datastore.base import open_datastore
from mq.base import open_queue
from mq.errors import QueueUnavailable
from worker.agent.agent import Agent
from worker.agent.drivers.docker import DockerDriver
from worker.dump import state_on_signal
from worker.loop import Worker
from worker.metrics import Metrics
from worker.rq_open import rq_names, rq_queues
from worker.shutdown import Shutdown, signal_handlers
from worker.upkeep import Upkeep

log = logging.getLogger("fnq.worker")

GC_YOUNG_THRESHOLD = 10_000  # see tune_garbage_collector


def setup_sentry(settings: Settings) -> None:
    """Report the worker's own errors (logged at ERROR, or uncaught) to Sentry; a
    function's failure is a call outcome, not a worker error.

    Only the integrations that serve that are on: the ones Sentry enables by itself
    for the libraries it finds (Redis, asyncpg, aiohttp, rq, http.client, ...) wrap
    every command and request the worker makes, which costs tens of microseconds
    each on the path of every call."""
    if settings.sentry_dsn is None:
        return
    # Imported only when configured.
    import sentry_sdk  # noqa: PLC0415
    from sentry_sdk.integrations.argv import ArgvIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.atexit import AtexitIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.dedupe import DedupeIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.excepthook import ExcepthookIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.logging import LoggingIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.modules import ModulesIntegration  # noqa: PLC0415
    from sentry_sdk.integrations.threading import ThreadingIntegration  # noqa: PLC0415

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        default_integrations=False,
        integrations=[
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
            ExcepthookIntegration(),
            ThreadingIntegration(),
            AtexitIntegration(),
            DedupeIntegration(),
            ArgvIntegration(),
            ModulesIntegration(),
        ],
    )


async def serve(
    settings: Settings,
    *,
    burst: bool = False,
    prefetch: int = 2,
    install_signals: bool = True,
    shutdown: Shutdown | None = None,
) -> int:
    """Run one worker until stopped; returns the number of calls it finished.

    With ``burst``, a queue still unreachable when the worker stops (it stopped
    for the outage, its work perhaps not done) raises QueueUnavailable. With
    ``install_signals``, SIGTERM/SIGINT stop it (worker.shutdown) and SIGUSR1
    logs what it is doing (worker.dump).
    """
    with state_on_signal() if install_signals else contextlib.nullcontext():
        return await _serve(settings, burst, prefetch, install_signals, shutdown)


async def _serve(
    settings: Settings,
    burst: bool,
    prefetch: int,
    install_signals: bool,
    shutdown: Shutdown | None,
) -> int:
    shutdown = shutdown or Shutdown(settings.secs("shutdown_grace_msecs"))
    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    queues = [open_queue(settings.mq_url, settings), *rq_queues(settings)]
    store = await open_datastore(settings)
    try:
        async with Agent(settings, DockerDriver(settings), clock=store.clock.now) as agent:
            worker = Worker(settings, queues, store, agent, prefetch=prefetch, metrics=metrics)
            tune_garbage_collector()
            names = rq_names(settings)
            also = f", RQ queues {', '.join(names)}" if names else ""
            log.info("worker %s started: queue %s%s",
                     worker.worker_id, _scheme(settings.mq_url), also)  # fmt: skip
            for name in unknown_env_names():
                log.warning("%s is not a setting of fnq: ignored", name)
            guard = signal_handlers(shutdown) if install_signals else contextlib.nullcontext()
            upkeep = Upkeep(
                worker.worker_id, store, agent, metrics, worker.running.keys,
                queues=queues if settings.metrics_port else (),  # only served metrics read them
            )  # fmt: skip
            with guard:
                async with asyncio.TaskGroup() as tg:
                    side = tg.create_task(upkeep.run(), name="fnq-upkeep")
                    await worker.run(shutdown, burst=burst)
                    side.cancel()
                await upkeep.leave()
            back = sum(metrics.calls.handed_back.values())
            lapse = worker.calls.left_to_lapse
            left = f", {lapse} left to come back as their reservations lapse" if lapse else ""
            log.info("worker %s stopped after %d call(s) ended here, %d handed back to the "
                     "queue%s", worker.worker_id, worker.completed, back, left)  # fmt: skip
            if burst and worker.unreached:  # it stopped for the outage, not for an empty queue
                error = worker.unreached[0]
                raise QueueUnavailable(f"burst stopped with the queue unreachable: {error}")
            return worker.completed
    finally:
        await store.close()
        for queue in queues:
            await queue.close()


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit of open files to its hard limit; the limits
    before and after when it was raised, else None.

    Each container takes about ten of the worker's descriptors (its output pipes,
    its attach stream, the wait for its exit, the connection to its socket, its
    cgroup's counters). A service manager's usual soft limit, 1024 (kept low for
    programs that still use select(), which the worker does not), would stop a
    worker at about a hundred containers, while its hard limit is far higher.
    An operator who wants fewer sets the hard limit (``LimitNOFILE=``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard) or soft >= hard:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:  # above the kernel's nr_open, say
        log.debug("the open files limit stays at %d: %s", soft, exc)
        return None
    return soft, hard


def tune_garbage_collector() -> None:
    """Set the garbage collector up for serving calls.

    What starting made (modules, settings, clients: about 60,000 objects that
    live as long as the worker) is taken out of its sight. Without this, every
    full collection scans them all: a pause of tens of milliseconds in the
    middle of calls (measured: 55 ms for one), which is where the worst
    latencies came from.

    Then collections of the youngest objects are made rarer. Serving calls
    leaves next to no cyclic garbage (0 to 79 objects in bursts of 9,000
    calls): the objects of the calls in flight are freed by their reference
    counts, and a collection at the default threshold (700 net new objects)
    only scanned them, every few calls: about 10 us per call in all.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]
