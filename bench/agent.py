"""The agent core on the real engine: hot calls against a raw client, and cold starts.

    .venv/bin/python -m bench.agent            # 2,000 calls per run, 7 rounds
    .venv/bin/python -m bench.agent --quick    # 200 calls per run, 3 rounds

Everything runs in this process: an ``Agent`` over a ``DockerDriver`` (settings
from ``load_settings``, freezing off so that the raw client is never paused
under it) and the example FDK function (``fnq/example``), on uvloop and with the
garbage collector set up as ``fnq worker`` sets it (worker.runtime).

* agent 1x      ``Agent.submit`` awaited once per call (one hot container); the
                calls are made before the clock starts, as the raw client's request is
* raw 1x        the ceiling: a minimal HTTP/1.1 client (bench._common) on the socket
                of the container that ran the agent's last sequential calls, one
                kept-alive connection, the same request
* agent 4x      four tasks submitting at once (the agent starts up to 4 containers)
* raw 4x        one raw client per container the agent started, all at once

Every timed run starts with ``SETTLE_CALLS`` untimed calls of its own kind (the
raw client's on the connection it then times): the run before it was the other
party's or the other way's, and the first calls after such a switch are slower
on this kind of host, whoever makes them.

Cold start: the first call of a new function configuration (a fresh config
value, so a new slot queue and a new container: create, start, socket, call)
against ``docker run`` of the same image. Two baselines:

* docker run + 1 call: ``docker run --rm -d`` with the socket directory mounted
  and FN_LISTENER set, wait for the socket, POST one call (time to the answer,
  the same span as the agent's first call; removal not counted);
* docker run true: ``docker run --rm IMAGE true`` (start, exit, removal, no FDK).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench._common import (
    Section,
    Table,
    bench_settings,
    docker_run_one_call,
    docker_run_trivial,
    label_tag,
    median,
    raw_rate,
    remove_labelled,
    run,
)
from config.domain import Call, CallStatus, Function, frozen_map, new_call_id
from worker.agent.agent import Agent
from worker.agent.drivers.docker import DockerDriver
from worker.agent.drivers.docker_container import DockerContainer
from worker.runtime import tune_garbage_collector

IMAGE = "fnq/example"
BODY = b'{"name": "bench"}'
TARGET_RATIO = 0.70
TARGET_COLD_EXTRA_MS = 100.0
WARM_ROUNDS_MAX = 6  # rounds of 400 calls, 4 at once, before anything is timed
SETTLE_CALLS = 200  # untimed, before each timed run (per task, or per raw client)


def example(name: str = "example", **config: str) -> Function:
    return Function(app="bench", name=name, image=IMAGE, memory_mb=128, config=frozen_map(config))


def make_calls(fn: Function, n: int) -> list[Call]:
    return [Call(new_call_id(), fn.app, fn.name, BODY) for _ in range(n)]


async def run_calls(agent: Agent, fn: Function, calls: list[Call]) -> str | None:
    """Submit ``calls`` one after another; the container of the last one."""
    container = None
    for call in calls:
        out = await agent.submit(call, fn)
        if out.status is not CallStatus.SUCCESS:
            raise RuntimeError(f"call failed: {out.status} {out.error}")
        container = out.container_id
    return container


async def submit_n(agent: Agent, fn: Function, n: int) -> None:
    await run_calls(agent, fn, make_calls(fn, n))


async def _in_tasks(agent: Agent, fn: Function, batches: list[list[Call]]) -> list[str | None]:
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run_calls(agent, fn, batch)) for batch in batches]
    return [task.result() for task in tasks]


async def timed_rate(agent: Agent, fn: Function, n: int, tasks: int, settle: int = 0) -> float:
    """calls/s of ``n`` calls from ``tasks`` tasks at once, after ``settle`` untimed
    calls per task."""
    return (await _timed(agent, fn, n, tasks, settle))[0]


async def _timed(
    agent: Agent, fn: Function, n: int, tasks: int, settle: int = 0
) -> tuple[float, list[str | None]]:
    """:func:`timed_rate`, and the container of each task's last call."""
    # The calls are made before the clock starts: making one (its id, the object) is
    # the producer's work, as the raw client's request is made before its loop.
    if settle:
        await _in_tasks(agent, fn, [make_calls(fn, settle) for _ in range(tasks)])
    batches = [make_calls(fn, n // tasks) for _ in range(tasks)]
    t0 = time.perf_counter()
    last = await _in_tasks(agent, fn, batches)
    return (n // tasks) * tasks / (time.perf_counter() - t0), last


def _starts(agent: Agent, fn: Function) -> tuple[int, int]:
    """Containers of ``fn`` started so far, and those still starting."""
    stats = agent.statistics().queue(fn.ref)
    if stats is None:
        return 0, 0
    starting = stats.containers.get("start", 0) + stats.containers.get("wait", 0)
    return stats.containers_started, starting


def ready(driver: DockerDriver) -> list[DockerContainer]:
    """The containers whose socket is up (a 4-way run may leave one still starting)."""
    return [c for c in driver.containers if c.iofs.socket_path.exists()]


async def hot_runs(agent: Agent, driver: DockerDriver, n: int, repeats: int) -> dict[str, float]:
    fn = example()
    await submit_n(agent, fn, 20)  # start the container, warm both ends
    # Then 4 at once until a round starts no container: the agent adds one while
    # calls wait beyond a call's time, and a start (a few hundred ms of CPU) inside
    # a timed run is no hot call. Long enough, too, that the function's first,
    # slower calls in the containers started here are over before anything is timed.
    for _ in range(WARM_ROUNDS_MAX):
        started = _starts(agent, fn)
        await timed_rate(agent, fn, 400, 4)
        if _starts(agent, fn) == started:
            break
    warm_starts = _starts(agent, fn)[0]

    seq_container: list[str | None] = [None]  # where the agent's last sequential calls ran

    async def agent_1x() -> float:
        rate, (seq_container[0],) = await _timed(agent, fn, n, 1, SETTLE_CALLS)
        return rate

    async def raw_1x() -> float:
        ready_now = ready(driver)
        same = [c for c in ready_now if c.id == seq_container[0]] or ready_now
        return await raw_rate([str(same[0].iofs.socket_path)], n, BODY, SETTLE_CALLS)

    async def agent_4x() -> float:
        return await timed_rate(agent, fn, n, 4, SETTLE_CALLS)

    async def raw_4x() -> float:
        sockets = [str(c.iofs.socket_path) for c in ready(driver)][:4]
        return await raw_rate(sockets, n // len(sockets), BODY, SETTLE_CALLS)

    runs: dict[str, list[float]] = {"agent 1x": [], "raw 1x": [], "agent 4x": [], "raw 4x": []}
    pairs: list[list[tuple[str, Callable[[], Awaitable[float]]]]] = [
        [("agent 1x", agent_1x), ("raw 1x", raw_1x)],
        [("agent 4x", agent_4x), ("raw 4x", raw_4x)],
    ]
    for i in range(repeats):
        # Whoever goes second finds the containers just used (the 4-way run's
        # other three have idled meanwhile): the order alternates between rounds.
        for pair in pairs:
            for name, measure_one in pair if i % 2 == 0 else reversed(pair):
                runs[name].append(await measure_one())
    out = {k: median(v) for k, v in runs.items()}
    # Each round's agent run against the raw run next to it: this machine's speed
    # drifts between rounds, and a pair sees the same machine.
    for way in ("1x", "4x"):
        out[f"ratio {way}"] = median(
            [a / r for a, r in zip(runs[f"agent {way}"], runs[f"raw {way}"], strict=True)]
        )
    out["containers"] = float(len(driver.containers))
    out["timed starts"] = float(_starts(agent, fn)[0] - warm_starts)
    return out


async def cold_runs(agent: Agent, repeats: int) -> dict[str, float]:
    agent_s: list[float] = []
    run_call_s: list[float] = []
    run_true_s: list[float] = []
    for i in range(repeats):
        fn = example(f"cold{i}", RUN=new_call_id())
        t0 = time.perf_counter()
        await submit_n(agent, fn, 1)
        agent_s.append(time.perf_counter() - t0)
        answered, _ = await asyncio.to_thread(docker_run_one_call, IMAGE, BODY)
        run_call_s.append(answered)
        run_true_s.append(await asyncio.to_thread(docker_run_trivial, IMAGE))
    return {
        "agent": 1000 * median(agent_s),
        "docker run + 1 call": 1000 * median(run_call_s),
        "docker run true": 1000 * median(run_true_s),
    }


async def measure(quick: bool) -> Section:
    n = 200 if quick else 2000
    repeats = 3 if quick else 7
    tag = label_tag()
    with tempfile.TemporaryDirectory(prefix="fnq-bench-agent-") as tmp:
        # No CPU split: the raw client shares this process, and its containers would
        # lose a CPU too (bench.e2e measures the split, through a worker).
        settings = bench_settings(Path(tmp) / "data", tag, freeze_idle_msecs=-1, cpu_split="off")
        driver = DockerDriver(settings)
        try:
            async with Agent(settings, driver) as agent:
                tune_garbage_collector()  # the agent runs here as in `fnq worker`
                hot = await hot_runs(agent, driver, n, repeats)
                cold = await cold_runs(agent, repeats + 1)
        finally:
            remove_labelled(tag)
    return report(hot, cold, n, repeats)


def _timed_starts(hot: dict[str, float]) -> str:
    starts = int(hot.get("timed starts", 0))
    return f"; {starts} more started during the timed runs" if starts else ""


def report(hot: dict[str, float], cold: dict[str, float], n: int, repeats: int) -> Section:
    sec = Section("Agent: hot calls and cold starts (bench/agent.py)")
    sec.notes.append(
        f"{n} calls of `{IMAGE}` per run, median of {repeats} rounds; the 4-way runs used "
        f"{int(hot['containers'])} container(s), started while warming up (400 calls "
        "4 at once, repeated until a round started no container)"
        f"{_timed_starts(hot)}. The raw client is the ceiling: the same "
        "request on the same container's socket with nothing else in the way (sequential: "
        "the container of the agent's last sequential calls). Each round runs the agent "
        "and the raw client one after the other, in turns first; `agent / raw` is the "
        "median of the rounds' own ratios. Each timed run follows "
        f"{SETTLE_CALLS} untimed calls of its own kind (per task or client; the raw "
        "client's on the connection it then times): after a switch from the other party "
        "or the other way, the first calls are slower on this host, whoever makes them."
    )
    seq_ratio, con_ratio = hot["ratio 1x"], hot["ratio 4x"]
    sec.tables.append(
        Table(
            "hot calls (calls/s)",
            ["run", "agent", "raw client", "agent / raw", "ms per call, agent", "ms, raw"],
            [
                [
                    "sequential",
                    hot["agent 1x"],
                    hot["raw 1x"],
                    f"{seq_ratio:.0%}",
                    1000 / hot["agent 1x"],
                    1000 / hot["raw 1x"],
                ],
                [
                    "4 at once",
                    hot["agent 4x"],
                    hot["raw 4x"],
                    f"{con_ratio:.0%}",
                    4000 / hot["agent 4x"],
                    4000 / hot["raw 4x"],
                ],
            ],
        )
    )
    sec.tables.append(
        Table(
            "first call of a new function (ms)",
            ["how", "ms"],
            [[k, v] for k, v in cold.items()],
        )
    )
    sec.notes.append(
        "Cold start: `agent` is `Agent.submit` of a fresh function configuration (create, "
        "start, socket ready, call answered). `docker run + 1 call` does the same work with "
        "the docker CLI (run -d with the socket directory mounted, wait for the socket, one "
        "POST; removal not counted); `docker run true` is a bare start-exit-remove without "
        "the FDK."
    )
    sec.check(
        "agent / raw, sequential",
        f"{seq_ratio:.0%}",
        f">= {TARGET_RATIO:.0%}",
        seq_ratio >= TARGET_RATIO,
    )
    sec.check(
        "agent / raw, 4 at once",
        f"{con_ratio:.0%}",
        f">= {TARGET_RATIO:.0%}",
        con_ratio >= TARGET_RATIO,
    )
    extra = cold["agent"] - cold["docker run + 1 call"]
    sec.check(
        "cold first call - docker run + 1 call",
        f"{extra:+.0f} ms",
        f"<= +{TARGET_COLD_EXTRA_MS:.0f} ms",
        extra <= TARGET_COLD_EXTRA_MS,
    )
    return sec


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 calls per run, 3 rounds")
    run(measure(parser.parse_args().quick)).print()
