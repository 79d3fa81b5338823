from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.agent.conftest import make_fn
from worker.agent.errors import ContainerInitFailed, ServerBusy
from worker.agent.evictor import Evictor
from worker.agent.logbuf import LogBuffer, truncation_marker
from worker.agent.resources import ResourceTracker, Shortfall
from worker.agent.slots import Caller, ContainerState, RequestState, SlotQueue, slot_key
from worker.agent.totals import MIB, ResourceTotals


class StubHot:
    """Stands in for a HotContainer where only wake() matters."""

    def __init__(self, name: str, frozen: bool = False) -> None:
        self.name = name
        self.frozen = frozen  # paused
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def queue() -> SlotQueue:
    fn = make_fn()
    return SlotQueue(slot_key(fn), fn)


# ----------------------------------------------------------------- key


def test_slot_key_is_stable_and_ignores_config_order() -> None:
    a = make_fn(config={"A": "1", "B": "2"})
    b = make_fn(config={"B": "2", "A": "1"})
    assert slot_key(a) == slot_key(b)
    assert len(slot_key(a)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"image": "other"},
        {"memory_mb": 256},
        {"cpus_mcpu": 500},
        {"timeout_s": 6},
        {"idle_timeout_s": 31},
        {"tmpfs_mb": 8},
        {"config": {"A": "1", "B": "3"}},
        {"name": "other", "image": "img/hello"},
        {"app": "other"},
    ],
)
def test_slot_key_changes_with_configuration(change: dict[str, Any]) -> None:
    base = make_fn(config={"A": "1", "B": "2"})
    assert slot_key(make_fn(**{"config": {"A": "1", "B": "2"}, **change})) != slot_key(base)


def test_slot_key_ignores_retry_policy() -> None:
    assert slot_key(make_fn(max_attempts=9)) == slot_key(make_fn())


# ---------------------------------------------------- isNewContainerNeeded


@pytest.mark.parametrize(
    ("waiting", "idle", "paused", "starting", "res_wait", "needed"),
    [
        (0, 0, 0, 0, 0, False),  # nobody waits
        (1, 0, 0, 0, 0, True),
        (1, 1, 0, 0, 0, False),  # an idle container absorbs the waiter
        (1, 0, 1, 0, 0, False),  # a paused one too
        (2, 1, 0, 0, 0, True),
        (2, 0, 0, 1, 0, True),  # one starting covers only one of two
        (2, 0, 0, 2, 0, False),
        (2, 0, 0, 1, 1, False),  # waiting for resources counts as starting
        (3, 1, 0, 1, 0, True),
        (3, 1, 0, 2, 0, False),
        (5, 2, 1, 1, 0, True),
    ],
)
def test_new_container_needed(
    waiting: int, idle: int, paused: int, starting: int, res_wait: int, needed: bool
) -> None:
    q = queue()
    q.asking = waiting
    q.containers[ContainerState.IDLE] = idle
    q.containers[ContainerState.PAUSED] = paused
    q.containers[ContainerState.START] = starting
    q.containers[ContainerState.WAIT] = res_wait
    assert q.new_container_needed() is needed


def test_busy_containers_do_not_count() -> None:
    q = queue()
    q.asking = 1
    q.containers[ContainerState.BUSY] = 3
    assert q.new_container_needed()


@pytest.mark.parametrize(
    ("call_s", "busy", "starting", "needed"),
    [
        (0.002, 2, 1, False),  # short calls, busy containers: one start at a time
        (0.002, 2, 0, True),  # ... but one may start
        (0.002, 0, 1, True),  # no busy container: the rule of counts alone
        (0.0, 2, 1, True),  # call time not known yet
        (0.5, 2, 1, True),  # long calls: starts go on side by side
    ],
)
def test_short_calls_on_busy_containers_launch_one_at_a_time(
    call_s: float, busy: int, starting: int, needed: bool
) -> None:
    q = queue()
    q.asking = 3
    q.call_s = call_s
    q.containers[ContainerState.BUSY] = busy
    q.containers[ContainerState.START] = starting
    assert q.new_container_needed() is needed


def test_only_callers_that_asked_count_towards_a_launch() -> None:
    q = queue()
    a, b = Caller("a"), Caller("b")
    q.join(a)
    q.join(b)
    assert not q.new_container_needed()  # both still within their patience
    q.nudge(a)
    q.nudge(a)  # asking again does not count twice
    assert q.asking == 1 and q.new_container_needed()
    q.containers[ContainerState.START] = 1
    assert not q.new_container_needed()  # the one asking has a container coming
    q.nudge(b)
    assert q.new_container_needed()
    q.leave(a)
    q.leave(a)
    assert q.asking == 1 and not q.new_container_needed()


def test_callers_with_a_launch_error_ask_for_no_container() -> None:
    # They only have to wake up and leave; a launch the launcher makes before they
    # have run would start a container no call waits for.
    q = queue()
    a, b, c = Caller("a"), Caller("b"), Caller("c")
    for caller in (a, b, c):
        q.join(caller)
        q.nudge(caller)
    assert q.fail_waiting(ContainerInitFailed("no socket")) == 3
    assert q.asking == 0 and not q.new_container_needed()
    q.nudge(a)  # a nudge already on its way does not count it again
    assert q.asking == 0 and not q.new_container_needed()
    d = Caller("d")
    q.join(d)
    q.nudge(d)
    assert q.asking == 1 and q.new_container_needed()
    assert q.fail(d, ContainerInitFailed("no socket")) and not q.fail(d, ServerBusy())
    assert q.asking == 0 and not q.new_container_needed()
    for caller in (a, b, c, d):
        q.leave(caller)
    assert q.asking == 0 and q.requests[RequestState.WAIT] == 0


# ------------------------------------------------------------- slots


def test_idle_slots_are_taken_last_in_first_out() -> None:
    q = queue()
    first, second, third = StubHot("1"), StubHot("2"), StubHot("3")
    for hot in (first, second, third):
        q.offer(hot)  # type: ignore[arg-type]
    taken = [q.take_idle(), q.take_idle(), q.take_idle(), q.take_idle()]
    assert [s.hot.name if s else None for s in taken] == ["3", "2", "1", None]  # type: ignore[attr-defined]
    assert q.idle_slots == 0


def test_a_container_not_paused_is_taken_before_paused_ones() -> None:
    # An unpause costs about 13 ms: an older container that is still running wins.
    q = queue()
    for name, frozen in (("old running", False), ("paused", True), ("newest paused", True)):
        q.offer(StubHot(name, frozen))  # type: ignore[arg-type]
    assert q.take_idle(thawed_only=True).hot.name == "old running"  # type: ignore[union-attr]
    assert q.take_idle(thawed_only=True) is None  # only paused ones are left
    taken = [q.take_idle(), q.take_idle(), q.take_idle()]
    assert [s.hot.name if s else None for s in taken] == ["newest paused", "paused", None]  # type: ignore[attr-defined]


def test_slot_race_has_exactly_one_winner() -> None:
    q = queue()
    hot = StubHot("1")
    slot = q.offer(hot)  # type: ignore[arg-type]
    results = [slot.try_take(), slot.try_take(), q.take_idle() is not None]
    assert results == [True, False, False]
    assert hot.woken == 0  # a call winning does not disturb the container's sleep


def test_container_winning_its_own_slot_hides_it_from_callers() -> None:
    q = queue()
    q.offer(StubHot("old"))  # type: ignore[arg-type]
    own = q.offer(StubHot("new"))  # type: ignore[arg-type]
    assert own.try_take()  # the container leaves (idle timeout)
    slot = q.take_idle()
    assert slot is not None and slot.hot.name == "old"  # type: ignore[attr-defined]


def test_offer_hands_the_slot_to_the_call_that_waited_longest() -> None:
    q = queue()
    a, b, c = Caller("a"), Caller("b"), Caller("c")
    for caller in (a, b, c):
        q.join(caller)
        q.nudge(caller)
    assert a.fail(RuntimeError("launch failed"))  # type: ignore[arg-type]
    first = q.offer(StubHot("1"))  # type: ignore[arg-type]
    # a holds a launch error: b has waited longest of the others, and only b is woken
    assert b.slot is first and first.taken and b.wake.is_set()
    assert c.slot is None and not c.wake.is_set()
    assert b not in q.waiters and q.requests[RequestState.WAIT] == 2 and q.asking == 2
    assert q.take_idle() is None  # nobody else can take it
    second = q.offer(StubHot("2"))  # type: ignore[arg-type]
    assert c.slot is second
    q.leave(a)
    q.leave(a)  # idempotent
    q.leave(c)  # a caller handed a slot has left already
    assert q.requests[RequestState.WAIT] == 0 and q.asking == 0
    third = q.offer(StubHot("3"))  # type: ignore[arg-type]
    assert not third.taken and q.take_idle() is third  # no one waits: kept for the next taker


def test_a_closed_queue_wakes_its_callers_and_hands_no_slot_over() -> None:
    q = queue()
    a, b = Caller("a"), Caller("b")
    q.join(a)
    q.join(b)
    q.close()
    assert a.wake.is_set() and b.wake.is_set()  # each finds the agent closing
    slot = q.offer(StubHot("1"))  # type: ignore[arg-type]
    assert a.slot is None and b.slot is None and not slot.taken
    assert q.requests[RequestState.WAIT] == 2  # they leave when they run


def test_launch_owner_prefers_the_nudger_then_the_oldest_without_error() -> None:
    q = queue()
    a, b, c = Caller("a"), Caller("b"), Caller("c")
    for caller in (a, b, c):
        q.join(caller)
    assert q.launch_owner(c) is c
    assert c.fail(RuntimeError("x"))  # type: ignore[arg-type]
    assert not c.fail(RuntimeError("again"))  # type: ignore[arg-type]
    assert q.launch_owner(c) is a
    q.leave(a)
    assert q.launch_owner(None) is b
    assert not a.fail(RuntimeError("gone"))  # type: ignore[arg-type]


async def test_nudge_hands_the_caller_to_the_launcher() -> None:
    q = queue()
    a = Caller("a")
    q.join(a)
    waiting = asyncio.create_task(q.next_nudge())
    await asyncio.sleep(0)
    assert not waiting.done()
    q.nudge(a)
    assert await asyncio.wait_for(waiting, 1) is a


def test_queue_is_idle_only_without_calls_and_containers() -> None:
    q = queue()
    assert q.is_idle()
    q.move(None, ContainerState.WAIT)
    assert not q.is_idle()
    q.move(ContainerState.WAIT, ContainerState.DONE)
    assert q.is_idle()
    q.requests[RequestState.EXEC] += 1
    assert not q.is_idle()


# ------------------------------------------------------------ evictor


def idle_token(ev: Evictor, key: str, mb: int, cpu: int = 0) -> Any:
    token = ev.register(key, mb, cpu, lambda: None)
    ev.enable(token)
    return token


def test_eviction_is_oldest_first_and_only_as_much_as_needed() -> None:
    ev = Evictor()
    a, b, c = idle_token(ev, "A", 128), idle_token(ev, "B", 128), idle_token(ev, "C", 128)
    done = ev.evict_for("X", Shortfall(memory_mb=200, cpu_mcpus=0))
    assert done == [a.done, b.done]
    assert a.requested and b.requested and not c.requested
    assert ev.evictions == 2


def test_eviction_leaves_containers_that_hold_none_of_what_is_missing() -> None:
    ev = Evictor()
    no_cpu = idle_token(ev, "A", 64)  # the oldest, but it frees no CPU
    cpu = idle_token(ev, "B", 64, 400)
    done = ev.evict_for("X", Shortfall(memory_mb=0, cpu_mcpus=200))
    assert done == [cpu.done]
    assert not no_cpu.requested and ev.evictions == 1
    assert ev.evict_for("X", Shortfall(memory_mb=100, cpu_mcpus=100)) == []  # 64 MB short
    assert not no_cpu.requested


def test_eviction_is_all_or_nothing() -> None:
    ev = Evictor()
    a = idle_token(ev, "A", 128)
    busy = ev.register("B", 512, 0, lambda: None)  # never enabled: busy
    assert ev.evict_for("X", Shortfall(memory_mb=256, cpu_mcpus=0)) == []
    assert not a.requested and not busy.requested
    assert ev.evict_for("X", Shortfall(memory_mb=64, cpu_mcpus=1000)) == []  # CPU not covered
    assert not a.requested


def test_eviction_never_takes_the_same_function() -> None:
    ev = Evictor()
    own = idle_token(ev, "A", 512)
    other = idle_token(ev, "B", 128)
    assert ev.evict_for("A", Shortfall(memory_mb=256, cpu_mcpus=0)) == []
    assert ev.evict_for("A", Shortfall(memory_mb=100, cpu_mcpus=0)) == [other.done]
    assert not own.requested


def test_eviction_calls_back_and_skips_empty_needs() -> None:
    ev = Evictor()
    calls: list[str] = []
    token = ev.register("A", 128, 100, lambda: calls.append("evict"))
    ev.enable(token)
    assert ev.evict_for("X", Shortfall(0, 0)) == []
    assert ev.evict_for("X", Shortfall(1, 1)) == [token.done]
    assert calls == ["evict"]


def test_room_on_the_host_takes_idle_containers_of_other_functions_by_count() -> None:
    """The host lacks room for another container (descriptors): any idle container of
    another function frees some, whatever memory or CPU it holds (none, even); the
    oldest go first, busy ones and the function's own stay; all or none."""
    ev = Evictor()
    own = idle_token(ev, "X", 128)
    a, b, c = idle_token(ev, "A", 0), idle_token(ev, "B", 128, 100), idle_token(ev, "C", 64)
    busy = ev.register("D", 128, 0, lambda: None)  # never enabled: busy
    assert len(ev) == 5 and a.evictable
    assert ev.evict_for("X", Shortfall(0, 0, containers=4)) == []  # only three could go
    assert not (a.requested or b.requested or c.requested)
    assert ev.evict_for("X", Shortfall(0, 0, containers=2)) == [a.done, b.done]
    assert not (own.requested or c.requested or busy.requested)
    assert ev.evictions == 2
    assert ev.idle() == (128 + 64, 0)  # what a and b held is no idle room any more


def test_lost_eviction_race_releases_the_launcher_and_requeues_the_token() -> None:
    ev = Evictor()
    a, b = idle_token(ev, "A", 128), idle_token(ev, "B", 128)
    [done] = ev.evict_for("X", Shortfall(100, 0))
    ev.disable(a)  # a call took the container first
    assert done.is_set() and a.done is not done and not a.requested
    ev.enable(a)
    assert ev.evict_for("X", Shortfall(100, 0)) == [b.done]  # a is now the youngest
    ev.unregister(b)
    assert b.done.is_set()


def test_the_room_idle_containers_hold_is_summed_and_told() -> None:
    told: list[tuple[int, int]] = []
    ev = Evictor(on_idle_change=lambda: told.append(ev.idle()))
    a = idle_token(ev, "A", 128, 100)
    b = idle_token(ev, "B", 256)
    ev.enable(b)  # again: no change
    assert ev.idle() == (384, 100)
    ev.disable(a)  # a call took it
    assert ev.idle() == (256, 0)
    assert ev.evict_for("X", Shortfall(100, 0)) == [b.done]  # leaving: not room any more
    assert ev.idle() == (0, 0)
    ev.enable(a)
    ev.unregister(a)
    assert ev.idle() == (0, 0)
    assert told == [(128, 100), (384, 100), (256, 0), (0, 0), (128, 100), (0, 0)]


# ------------------------------------------------------------- log buffer


def test_log_under_the_limit_is_kept_whole() -> None:
    buf = LogBuffer(10)
    buf.write(b"12345")
    buf.write(b"")
    buf.write(b"67890")
    assert buf.getvalue() == b"1234567890"
    assert not buf.truncated


def test_log_is_cut_at_the_limit_with_one_marker() -> None:
    buf = LogBuffer(10)
    for chunk in (b"1234", b"56789abc", b"more", b"and more"):
        buf.write(chunk)
    marker = truncation_marker(10)
    assert buf.getvalue() == b"123456789a" + marker
    assert buf.getvalue().count(marker) == 1
    assert buf.truncated and buf.dropped_bytes == 2 + 4 + 8


@pytest.mark.parametrize(
    ("call_s", "busy", "freed_ago_s", "cycling"),
    [
        (0.002, 1, 0.001, True),  # short calls, a container came free just now
        (0.002, 1, 0.5, False),  # every container stuck in a call
        (0.002, 0, 0.001, False),  # none busy: not waiting on them
        (0.0, 1, 0.001, False),  # call time not known yet
        (0.05, 1, 0.001, False),  # long calls
    ],
)
def test_short_calls_cycling(call_s: float, busy: int, freed_ago_s: float, cycling: bool) -> None:
    q = queue()
    if call_s:
        q.held(call_s, now=10.0)
    q.containers[ContainerState.BUSY] = busy
    assert q.short_calls_cycling(10.0 + freed_ago_s) is cycling


def test_short_goes_by_the_quickest_recent_hold() -> None:
    q = queue()
    q.containers[ContainerState.BUSY] = 1
    q.held(0.001, now=1.0)
    for _ in range(5):  # a loaded host: calls held longer while the worker is busy
        q.held(0.2, now=1.0)
    assert q.call_s > 0.05 and q.short_calls_cycling(1.0)
    for _ in range(500):  # the function itself has become slow
        q.held(0.2, now=1.0)
    assert not q.short_calls_cycling(1.0)
    q.held(0.002, now=1.0)  # one quick call is enough
    assert q.short_calls_cycling(1.0)


def test_busy_share_of_the_containers_over_quarter_second_windows() -> None:
    q = queue()
    q.containers[ContainerState.IDLE] = 1
    q.containers[ContainerState.BUSY] = 1
    assert q.busy_share(5.0) == 1.0  # nothing known yet: no hold back on its account
    q.held(0.1, now=10.0)  # the window begins when the first call took its container
    assert q.busy_share(10.0) == 1.0  # too young a window: the last whole one (none)
    q.held(0.1, now=10.1)
    q.held(0.1, now=10.2)  # 0.3 s held by two containers over 0.3 s: the window ends
    assert q.busy_share(10.2) == pytest.approx(0.5)
    q.held(0.2, now=10.3)  # the new window, 0.1 s old: busier than the last
    assert q.busy_share(10.3) == pytest.approx(1.0)
    assert q.busy_share(10.4) == pytest.approx(0.5)  # the last one's share is the floor
    q.held(0.01, now=12.0)  # a quiet spell ends the window
    assert q.busy_share(12.0) < 0.06


def test_containers_count_as_starting_until_they_first_idle_or_end() -> None:
    ev = Evictor()
    up, failed = ev.register("A", 128, 0, lambda: None), ev.register("B", 128, 0, lambda: None)
    assert ev.starting == 2
    ev.enable(up)  # its first idle slot: it is up
    assert ev.starting == 1
    ev.disable(up)
    ev.enable(up)  # idle again: counted once
    ev.unregister(failed)  # its start failed
    assert ev.starting == 0
    ev.unregister(up)
    assert ev.starting == 0


def test_a_connections_evictions_go_to_the_launch_that_starves_longest() -> None:
    tracker = ResourceTracker(ResourceTotals(memory_bytes=256 * MIB, cpu_mcpus=1000))
    ev = Evictor(first_starving=tracker.first_starving)
    idle = idle_token(ev, "A", 128)
    assert ev.evict_for_connection("B", 1) == [idle.done] and idle.heir is None  # none waits
    held = tracker.try_acquire(256, 0)
    assert held is not None
    later = tracker.request(128, 0)
    first, second = tracker.request(256, 0), tracker.request(128, 0)
    first.starving_since, second.starving_since = 2.0, 1.0  # second starves longest
    assert tracker.first_starving() is second and later.starving_since is None
    other = idle_token(ev, "C", 128)
    assert ev.evict_for_connection("B", 1) == [other.done] and other.heir is second
    for ticket in (later, first, second):
        ticket.withdraw()
    held.close()
