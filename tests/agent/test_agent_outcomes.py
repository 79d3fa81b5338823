"""Every way a call can end, as an Outcome, and what happens to its container."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import pytest

from config.domain import CallStatus, FailureKind, frozen_map
from config.errors import AgentError
from tests.agent.conftest import AgentFactory, make_call, make_fn
from worker.agent.driver import DispatchRequest, DispatchResult, ExitInfo
from worker.agent.drivers.fake import (
    FakeBehaviour,
    FakeContainer,
    FakeDriver,
    die,
    drop_then_die,
    fail,
    gated,
    hang,
    hang_up,
    reply,
)
from worker.agent.errors import (
    AgentClosed,
    ContainerInitFailed,
    ContainerInitTimeout,
    DispatchError,
    ImageHasVolume,
    ImageNotFound,
    ImagePullTimeout,
    InvalidResponse,
    NotDelivered,
    ResponseTooBig,
)
from worker.agent.hot import EXIT_SETTLE_S
from worker.agent.logbuf import truncation_marker


async def test_502_is_function_failed_and_keeps_the_container(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=reply(502, b"boom")))
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR
    assert outcome.error == "function failed: boom" and outcome.failure is FailureKind.FUNCTION
    assert outcome.image == fn.image  # the image that ran it
    assert outcome.response is not None and outcome.response.body == b"boom"
    again = await agent.submit(make_call(fn), fn)
    assert again.container_id == outcome.container_id
    assert (driver.creates, driver.removes) == (1, 0)


async def test_a_failed_call_s_error_quotes_the_start_of_what_the_function_said(
    agents: AgentFactory,
) -> None:
    said = b'{"error": "bad\n  input"}' + b" x" * 200
    agent = agents(FakeDriver(FakeBehaviour(handler=reply(502, said))))
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.error is not None
    assert outcome.error.startswith('function failed: {"error": "bad input"} x x')
    assert outcome.error.endswith("...") and len(outcome.error) == len("function failed: ") + 200
    assert outcome.response is not None and outcome.response.body == said  # kept whole
    silent = agents(FakeDriver(FakeBehaviour(handler=reply(502, b""))))
    assert (await silent.submit(make_call(fn), fn)).error == "function failed"
    # control characters (NUL, escapes) do not reach the error line; the body keeps them
    raw = agents(FakeDriver(FakeBehaviour(handler=reply(502, b"a\x00b \x1b[31mred"))))
    ended = await raw.submit(make_call(fn), fn)
    assert ended.error == "function failed: a\ufffdb \ufffd[31mred"
    assert ended.response is not None and ended.response.body == b"a\x00b \x1b[31mred"


async def test_oversized_response_is_a_terminal_error_and_keeps_the_body_cut(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=reply(200, b"x" * 64, truncated=True)))
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.TERMINAL
    assert outcome.error is not None and "response too large" in outcome.error
    assert outcome.response is not None and outcome.response.truncated
    assert outcome.response.body == b"x" * 64
    again = await agent.submit(make_call(fn), fn)
    assert again.container_id == outcome.container_id


async def test_504_is_timeout_and_keeps_the_container(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=reply(504)))
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.TIMEOUT and outcome.failure is FailureKind.FUNCTION
    await agent.submit(make_call(fn), fn)
    assert (driver.creates, driver.removes) == (1, 0)


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (reply(500), "invalid function response: status 500"),
        (reply(201), "invalid function response: status 201"),
        (fail(InvalidResponse("the function sent a malformed response")), "malformed"),
        (fail(ResponseTooBig("the response is larger than 1 MiB")), "larger than"),
        (fail(DispatchError("connection reset")), "error receiving the function's response"),
    ],
)
async def test_bad_answers_are_errors_and_retire_the_container(
    agents: AgentFactory, handler: object, message: str
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=handler))  # type: ignore[arg-type]
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.FUNCTION
    assert outcome.error is not None and message in outcome.error
    await driver.wait_until(lambda: driver.removes == 1)
    assert agent.statistics().resources.memory_used_bytes == 0
    driver.default.handler = reply()
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.creates == 2


async def test_call_past_its_timeout_is_timeout_and_kills_the_container(
    agents: AgentFactory,
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=hang(output=(b"working\n",))))
    agent = agents(driver)
    fn = make_fn(timeout_s=1)
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.TIMEOUT and outcome.failure is FailureKind.FUNCTION
    assert outcome.error == "the function ran longer than 1 s"
    assert outcome.log == b"working\n"
    await driver.wait_until(lambda: driver.removes == 1)


async def test_each_call_carries_its_own_resource_use_however_it_ends(
    agents: AgentFactory,
) -> None:
    use = iter([{"cpu_ms": 1.5}, {"cpu_ms": 900.0, "memory_peak_mb": 64.0}, {"cpu_ms": 2.5}])

    async def measured(container: FakeContainer, request: DispatchRequest) -> DispatchResult:
        container.stats = next(use)
        if container.stats["cpu_ms"] > 100:
            await asyncio.Event().wait()  # this one runs past its timeout
        return DispatchResult(200, frozen_map(), b"ok")

    driver = FakeDriver(FakeBehaviour(handler=measured))
    agent = agents(driver)
    fn = make_fn(timeout_s=1)
    answered = await agent.submit(make_call(fn), fn)
    timed_out = await agent.submit(make_call(fn), fn)
    again = await agent.submit(make_call(fn), fn)
    assert (answered.status, timed_out.status, again.status) == (
        CallStatus.SUCCESS,
        CallStatus.TIMEOUT,
        CallStatus.SUCCESS,
    )
    assert dict(answered.stats) == {"cpu_ms": 1.5}
    assert dict(timed_out.stats) == {"cpu_ms": 900.0, "memory_peak_mb": 64.0}
    assert dict(again.stats) == {"cpu_ms": 2.5}


async def test_driver_timeout_is_a_timeout_too(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=fail(TimeoutError())))  # type: ignore[arg-type]
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.TIMEOUT
    await driver.wait_until(lambda: driver.removes == 1)


@pytest.mark.parametrize(
    ("exit_code", "oom", "message"),
    [
        (3, False, "container exited with code 3"),
        (137, True, "container was killed: out of memory (limit 128 MB)"),
        (137, False, "container was killed (exit code 137)"),  # `docker kill`, not its memory
    ],
)
async def test_container_dying_mid_call_is_an_error_and_replaced(
    agents: AgentFactory, exit_code: int, oom: bool, message: str
) -> None:
    driver = FakeDriver(FakeBehaviour(handler=die(exit_code, oom, output=(b"last words\n",))))
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.FUNCTION
    assert outcome.error == message
    assert outcome.log == b"last words\n"
    driver.default.handler = reply()
    assert (await agent.submit(make_call(fn), fn)).status is CallStatus.SUCCESS
    assert driver.creates == 2
    await driver.wait_until(lambda: driver.removes == 1)


@pytest.mark.parametrize(
    ("behaviour", "failure"),
    [
        (FakeBehaviour(create_error=ImageNotFound("image img/hello not found")), "terminal"),
        (FakeBehaviour(create_error=ImageHasVolume("image declares a VOLUME")), "terminal"),
        (FakeBehaviour(create_error=ImagePullTimeout("pull took too long")), "busy"),
        (FakeBehaviour(start_error=ContainerInitFailed("no socket: exited")), "function"),
        (FakeBehaviour(start_error=ContainerInitTimeout("no socket in 5 s")), "function"),
    ],
)
async def test_launch_failures_reach_the_call_once(
    agents: AgentFactory, behaviour: FakeBehaviour, failure: str
) -> None:
    driver = FakeDriver(behaviour)
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR
    assert outcome.failure is FailureKind(failure)
    error = behaviour.create_error or behaviour.start_error
    assert outcome.error == str(error)
    assert not outcome.started and outcome.container_id is None
    assert driver.creates == 1  # no silent retry loop
    await driver.wait_until(lambda: agent.statistics().resources.tokens == 0)


@pytest.mark.parametrize(
    ("create_error", "start_error"),
    [
        (ImageNotFound("image img/hello not found"), None),
        (None, ContainerInitFailed("no socket: exited")),
        (None, ContainerInitTimeout("no socket in 5 s")),
    ],
)
async def test_a_start_failure_every_start_meets_ends_every_waiting_call(
    agents: AgentFactory, create_error: AgentError | None, start_error: AgentError | None
) -> None:
    # Ten calls, one start turn: the first start fails, and the nine calls waiting
    # for a container get its error at once instead of one failing start each.
    gate = asyncio.Event()
    behaviour = FakeBehaviour(start_gate=gate, create_error=create_error, start_error=start_error)
    driver = FakeDriver(behaviour)
    agent = agents(driver, hot_start_concurrency=1)
    fn = make_fn()
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(10)]
    if start_error is not None:
        await driver.wait_until(lambda: driver.starts == 1)
    gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls), 2.0)
    assert {o.error for o in outcomes} == {str(create_error or start_error)}
    assert all(not o.started for o in outcomes)
    assert driver.creates == 1  # the starts waiting for the turn were dropped
    await driver.wait_until(lambda: agent.statistics().resources.tokens == 0)


async def test_starts_failing_after_their_calls_ended_are_not_warned_of(
    agents: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Three starts at once, all failing alike: the first ends every waiting call;
    # the two others find no call waiting, which is no news worth a warning.
    gate = asyncio.Event()
    behaviour = FakeBehaviour(start_gate=gate, start_error=ContainerInitFailed("exited"))
    driver = FakeDriver(behaviour)
    agent = agents(driver, hot_start_concurrency=3)
    fn = make_fn()
    calls = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(6)]
    await driver.wait_until(lambda: driver.starts == 3)
    with caplog.at_level(logging.INFO, logger="fnq.agent.hot"):
        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*calls), 2.0)
        await driver.wait_until(lambda: agent.statistics().resources.tokens == 0)
    assert {o.error for o in outcomes} == {"exited"}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert sum("another container" in m for _, m in messages) == 2, messages
    assert [m for level, m in messages if level >= logging.WARNING] == []


async def test_a_failed_start_nobody_waits_for_is_warned_of(
    agents: AgentFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()
    driver = FakeDriver(FakeBehaviour(start_gate=gate, start_error=ContainerInitFailed("exited")))
    agent = agents(driver)
    fn = make_fn()
    call = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.starts == 1)
    call.cancel()  # the call goes away while its container starts
    with contextlib.suppress(asyncio.CancelledError):
        await call
    with caplog.at_level(logging.INFO, logger="fnq.agent.hot"):
        gate.set()
        await driver.wait_until(lambda: agent.statistics().resources.tokens == 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == ["container of app/hello failed to start, no call waits: exited"]


async def test_a_start_failure_beside_a_serving_container_ends_only_its_own_call(
    agents: AgentFactory,
) -> None:
    # The function has started before: a failed start (a flaky one, say) is no
    # reason to fail the other waiting calls, which get the serving container.
    call_gate, first_start, later_starts = asyncio.Event(), asyncio.Event(), asyncio.Event()
    behaviour = FakeBehaviour(handler=gated(call_gate))
    driver = FakeDriver(behaviour)
    agent = agents(driver, hot_start_concurrency=1)
    fn = make_fn()
    first = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.dispatches == 1)  # its container is busy
    behaviour.start_error = ContainerInitFailed("no socket: exited")
    behaviour.start_gate = first_start
    waiting = [asyncio.create_task(agent.submit(make_call(fn), fn)) for _ in range(3)]
    await driver.wait_until(lambda: driver.starts == 2)  # the second start holds the turn
    behaviour.start_gate = later_starts  # the starts after it wait here
    first_start.set()
    await driver.wait_until(lambda: sum(t.done() for t in waiting) == 1)
    call_gate.set()  # the busy container comes free and serves the two others
    outcomes = await asyncio.wait_for(asyncio.gather(first, *waiting), 2.0)
    later_starts.set()
    statuses = [o.status for o in outcomes]
    assert statuses.count(CallStatus.SUCCESS) == 3 and statuses.count(CallStatus.ERROR) == 1
    assert [o.error for o in outcomes if o.status is CallStatus.ERROR] == ["no socket: exited"]


async def test_unexpected_driver_fault_reaches_the_call(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(start_error=RuntimeError("socket vanished")))  # type: ignore[arg-type]
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.failure is FailureKind.FUNCTION
    assert outcome.error == "the container could not start: socket vanished"


async def test_too_big_is_rejected_at_once(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver, memory_mb=512)
    fn = make_fn(memory_mb=500, tmpfs_mb=100)
    outcome = await asyncio.wait_for(agent.submit(make_call(fn), fn), 0.5)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.TERMINAL
    assert outcome.error is not None and "600 MB" in outcome.error
    assert driver.creates == 0


MEMORY_FOR_ONE = 200  # MB: one container of a 128 MB function, not two


async def test_waiting_past_the_timeout_is_busy(agents: AgentFactory) -> None:
    # Room for one container, busy with a long call: nothing is starting for the next.
    # The next call waits from before the long one is dispatched, so its 1 s are over
    # before the long call's timeout frees the container (and room for another).
    started, gate = asyncio.Event(), asyncio.Event()
    driver = FakeDriver(FakeBehaviour(handler=gated(gate), start_gate=started))
    agent = agents(driver, memory_mb=MEMORY_FOR_ONE)
    fn = make_fn(timeout_s=1)
    first = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: driver.starts == 1)
    second = asyncio.create_task(agent.submit(make_call(fn), fn))
    await driver.wait_until(lambda: agent.statistics().calls_waiting == 2)
    started.set()  # the container goes to the call that waited longest: the first
    await driver.wait_until(lambda: driver.dispatches == 1)
    outcome = await asyncio.wait_for(second, 5)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.BUSY
    assert outcome.error is not None and "server too busy" in outcome.error
    assert (await first).status is CallStatus.TIMEOUT  # it held the container past 1 s
    gate.set()


async def test_a_call_waits_past_its_timeout_for_the_start_it_caused(
    agents: AgentFactory,
) -> None:
    # A start slower than the call's timeout: the call gets the start's outcome.
    slow = FakeDriver(FakeBehaviour(start_delay_s=1.5))
    fn = make_fn(timeout_s=1)
    ran = await agents(slow).submit(make_call(fn), fn)
    assert ran.status is CallStatus.SUCCESS
    broken = FakeDriver(
        FakeBehaviour(start_delay_s=1.5, start_error=ContainerInitTimeout("no socket in 1.5 s"))
    )
    failed = await agents(broken).submit(make_call(fn), fn)
    assert failed.status is CallStatus.ERROR and failed.failure is FailureKind.FUNCTION
    assert failed.error == "no socket in 1.5 s"


async def test_closed_agent_answers_busy(agents: AgentFactory) -> None:
    agent = agents()
    await agent.close(grace_s=0)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.failure is FailureKind.BUSY
    assert outcome.error == str(AgentClosed())


async def test_log_is_truncated_with_exactly_one_marker(agents: AgentFactory) -> None:
    chunks = (b"0123456789", b"abcdefghij", b"klmnop", b"qrstuv")
    driver = FakeDriver(FakeBehaviour(handler=reply(output=chunks)))
    agent = agents(driver, max_log_size_bytes=15)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    marker = truncation_marker(15)
    assert outcome.log == b"0123456789abcde" + marker
    assert outcome.log.count(marker) == 1
    assert outcome.log_truncated


async def test_output_between_calls_stays_out_of_call_logs(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(handler=reply(output=(b"during\n",))))
    agent = agents(driver)
    fn = make_fn()
    await agent.submit(make_call(fn), fn)
    [container] = driver.containers
    container.emit(b"between\n")
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.log == b"during\n"
    assert container.debug_output == [b"between\n"]


async def test_a_container_exiting_while_idle_leaves_quietly(agents: AgentFactory) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    first = await agent.submit(make_call(fn), fn)
    driver.containers[0].exit(ExitInfo(exit_code=1))
    await driver.wait_until(lambda: driver.removes == 1)
    assert agent.statistics().resources.tokens == 0
    second = await agent.submit(make_call(fn), fn)
    assert second.status is CallStatus.SUCCESS and second.container_id != first.container_id


async def test_a_call_on_a_container_that_died_unnoticed_runs_on_another(
    agents: AgentFactory,
) -> None:
    # The container died while idle and the agent has not heard of the exit yet: its
    # socket takes no connection, the request never left, and the call is not the
    # function's failure.
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    first = await agent.submit(make_call(fn), fn)
    driver.containers[0].exit(ExitInfo(exit_code=1))
    second = await agent.submit(make_call(fn), fn)  # before the exit reaches the agent
    assert second.status is CallStatus.SUCCESS, second.error
    assert second.container_id not in (None, first.container_id)
    assert [len(c.requests) for c in driver.containers] == [1, 1]
    await driver.wait_until(lambda: driver.removes == 1)


async def test_a_call_counts_as_dispatched_only_once_a_container_takes_its_connection(
    agents: AgentFactory,
) -> None:
    # The container died unnoticed: its socket takes no connection, so the call never
    # reached the function and waits for another container. Only when one takes the
    # call is it dispatched: until then it is a waiting call (it stays `queued`, keeps
    # its prefetch place, and at the first stop request goes back unstarted).
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    await agent.submit(make_call(fn), fn)
    gate = asyncio.Event()
    driver.default = FakeBehaviour(start_gate=gate)  # the next container starts on cue
    driver.containers[0].die_unseen(ExitInfo(exit_code=1))
    dispatched: list[int] = []
    second = asyncio.create_task(
        agent.submit(make_call(fn), fn, on_start=lambda: dispatched.append(len(driver.containers)))
    )
    await driver.wait_until(lambda: driver.starts == 2)
    assert dispatched == []
    gate.set()
    out = await asyncio.wait_for(second, 5)
    assert out.status is CallStatus.SUCCESS, out.error
    assert dispatched == [2]


async def test_a_live_container_whose_socket_refuses_fails_the_call(
    agents: AgentFactory,
) -> None:
    # Alive, yet nothing listens: the function's fault. The call ends once, as an
    # error, rather than moving from one new container to the next.
    driver = FakeDriver(FakeBehaviour(handler=fail(NotDelivered("connection refused"))))
    agent = agents(driver)
    fn = make_fn()
    out = await agent.submit(make_call(fn), fn)
    assert out.status is CallStatus.ERROR
    assert out.error == "the function's socket took no connection: connection refused"
    assert len(driver.containers) == 1
    await driver.wait_until(lambda: driver.removes == 1)


async def test_a_dead_container_a_watching_driver_saw_go_costs_the_call_no_wait(
    agents: AgentFactory,
) -> None:
    # The container died between calls and the engine has not reported it; the driver
    # watches its process and says, with the refusal, that it is gone. The call goes
    # to another container at once, without waiting for the engine's report.
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    first = await agent.submit(make_call(fn), fn)
    driver.containers[0].die_unseen(ExitInfo(exit_code=1), watched=True)
    loop = asyncio.get_running_loop()
    began = loop.time()
    out = await agent.submit(make_call(fn), fn)
    took = loop.time() - began
    assert out.status is CallStatus.SUCCESS, out.error
    assert out.container_id not in (None, first.container_id)
    assert took < EXIT_SETTLE_S / 2, took
    await driver.wait_until(lambda: driver.removes == 1)


@pytest.mark.parametrize("watched", [True, False])
async def test_a_live_container_that_closed_its_listener_fails_the_call(
    agents: AgentFactory, watched: bool
) -> None:
    # The function closed its listener and lives on: the call fails as the function's
    # error. A driver that watches the process says it lives on, and the call fails at
    # once; with one that does not tell, the agent first waits for an exit report.
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    first = await agent.submit(make_call(fn), fn)
    driver.containers[0].close_listener(watched=watched)
    loop = asyncio.get_running_loop()
    began = loop.time()
    out = await agent.submit(make_call(fn), fn)
    took = loop.time() - began
    assert (out.status, out.failure) == (CallStatus.ERROR, FailureKind.FUNCTION)
    assert out.error == (
        "the function's socket took no connection: "
        f"container {first.container_id} refused the connection"
    )
    if watched:
        assert took < EXIT_SETTLE_S / 2, took
    else:
        assert took >= EXIT_SETTLE_S, took
    assert len(driver.containers) == 1  # no new container was tried for it
    await driver.wait_until(lambda: driver.removes == 1)


async def test_a_call_the_function_never_accepts_fails_unstarted_and_its_container_goes(
    agents: AgentFactory,
) -> None:
    # The function answers one call, then accepts no connection any more: the next
    # call's connection waits in its backlog until the call's timeout. That call never
    # reached the function: no run, no timeout of it, but the function's failure (as a
    # container that never starts); the stuck container is retired.
    async def answer_then_stop_accepting(
        container: FakeContainer, request: DispatchRequest
    ) -> DispatchResult:
        container.stop_accepting()
        return DispatchResult(200, frozen_map(), b"ok")

    driver = FakeDriver(FakeBehaviour(handler=answer_then_stop_accepting))
    agent = agents(driver)
    fn = make_fn(timeout_s=1)
    first = await agent.submit(make_call(fn), fn)
    assert first.status is CallStatus.SUCCESS, first.error
    loop = asyncio.get_running_loop()
    began = loop.time()
    out = await agent.submit(make_call(fn), fn)
    assert loop.time() - began >= 1.0  # the call's timeout, waited for the function
    assert (out.status, out.failure, out.started) == (
        CallStatus.ERROR,
        FailureKind.FUNCTION,
        False,
    )
    assert out.error == (
        f"container {first.container_id} of {fn.ref} did not accept the call within 1 s "
        "(the connection waited in the function's listener backlog); the call did not "
        "reach the function"
    )
    await driver.wait_until(lambda: driver.removes == 1)
    assert driver.dispatches == 1  # the second call never reached a function
    again = await agent.submit(make_call(fn), fn)
    assert again.status is CallStatus.SUCCESS, again.error
    assert again.container_id != first.container_id


async def test_a_function_that_hangs_up_and_lives_on_fails_the_call_at_once(
    agents: AgentFactory,
) -> None:
    # The driver watched the process after the broken connection: it lives on. No
    # exit is coming, so none is waited for.
    driver = FakeDriver(FakeBehaviour(handler=hang_up(exited=False)))
    agent = agents(driver)
    fn = make_fn()
    loop = asyncio.get_running_loop()
    began = loop.time()
    out = await agent.submit(make_call(fn), fn)
    took = loop.time() - began
    assert (out.status, out.failure) == (CallStatus.ERROR, FailureKind.FUNCTION)
    assert out.error == (
        "error receiving the function's response: the connection closed without a response"
    )
    assert took < EXIT_SETTLE_S / 2, took
    await driver.wait_until(lambda: driver.removes == 1)


async def test_a_function_that_hangs_up_and_exits_ends_as_exited(agents: AgentFactory) -> None:
    # The driver saw the process exit after the break; the engine's report follows.
    # (A driver that does not watch: see the test of drop_then_die.)
    driver = FakeDriver(FakeBehaviour(handler=hang_up(exited=True, exit_code=3)))
    agent = agents(driver)
    fn = make_fn()
    out = await agent.submit(make_call(fn), fn)
    assert (out.status, out.failure) == (CallStatus.ERROR, FailureKind.FUNCTION)
    assert out.error == "container exited with code 3"


def test_every_not_started_error_has_a_failure_kind() -> None:
    for cls in (AgentClosed, ImageNotFound, ImagePullTimeout, ContainerInitFailed):
        assert isinstance(cls.failure, FailureKind)
        assert issubclass(cls, AgentError)


async def test_parallel_calls_to_a_broken_function_all_fail_fast(agents: AgentFactory) -> None:
    driver = FakeDriver(FakeBehaviour(start_error=ContainerInitFailed("the FDK exited")))
    agent = agents(driver)
    fn = make_fn(timeout_s=30)
    loop = asyncio.get_running_loop()
    began = loop.time()
    outcomes = await asyncio.gather(*(agent.submit(make_call(fn), fn) for _ in range(3)))
    assert all(o.failure is FailureKind.FUNCTION for o in outcomes)
    assert all(o.error == "the FDK exited" for o in outcomes)
    assert 1 <= driver.creates <= 3
    assert loop.time() - began < 2.0


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Split": "a\r\nX-Injected: 1"},
        {"Bad Name": "x"},
        {"X-Ctl": "a\x01b"},  # the FDK answered 400: retried as the function's failure
        {"X-Lone": "\udcff"},  # could not be encoded: the call failed unrecorded
        {f"X-{i}": "v" * 1000 for i in range(70)},  # 70 KiB: over the headers' bound
    ],
    ids=[
        "value-with-newline",
        "name-with-space",
        "control-character",
        "lone-surrogate",
        "too-big-together",
    ],
)
async def test_a_header_that_cannot_be_sent_is_a_terminal_error_before_any_container(
    agents: AgentFactory, headers: dict[str, str]
) -> None:
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn, headers=headers), fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.TERMINAL
    assert outcome.error is not None and "header" in outcome.error
    assert not outcome.started and driver.creates == 0


async def test_a_dropped_connection_then_an_exit_is_reported_as_the_exit(
    agents: AgentFactory,
) -> None:
    # The usual order on a real engine: the socket breaks, then the engine reports
    # the exit. The call waits a moment for that, and says how the container died.
    driver = FakeDriver(FakeBehaviour(handler=drop_then_die(exit_code=3)))
    agent = agents(driver)
    fn = make_fn()
    outcome = await agent.submit(make_call(fn), fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.FUNCTION
    assert outcome.error == "container exited with code 3"


@pytest.mark.parametrize("call_id", ["x\r\nFn-Call-Id: other", "a/../../b", "", "x" * 200])
async def test_a_call_id_that_cannot_be_sent_is_a_terminal_error_before_any_container(
    agents: AgentFactory, call_id: str
) -> None:
    # Queues refuse such ids; the agent does not rely on it: the id goes into the
    # request's head (Fn-Call-Id) as it is.
    driver = FakeDriver()
    agent = agents(driver)
    fn = make_fn()
    call = dataclasses.replace(make_call(fn), id=call_id)
    outcome = await agent.submit(call, fn)
    assert outcome.status is CallStatus.ERROR and outcome.failure is FailureKind.TERMINAL
    assert outcome.error is not None and "call id" in outcome.error
    assert not outcome.started and driver.creates == 0
