from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.settings import Settings
from tests.agent.conftest import make_settings, tracker
from worker.agent.errors import ResourceTooBig
from worker.agent.resources import ResourceToken, ResourceTracker, Shortfall
from worker.agent.totals import (
    HEAD_ROOM_MAX_BYTES,
    HEAD_ROOM_MIN_BYTES,
    MIB,
    HostPaths,
    measure_totals,
)

GIB = 1024 * MIB


def host(root: Path, files: dict[str, str]) -> HostPaths:
    paths = HostPaths.under(root)
    for name, text in files.items():
        path: Path = getattr(paths, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return paths


def meminfo(kb: int) -> str:
    return f"MemTotal:       99999999 kB\nMemFree: 1 kB\nMemAvailable:   {kb} kB\n"


CPUINFO_8 = "".join(f"processor\t: {i}\nmodel name\t: x\n\n" for i in range(8))


@pytest.fixture
def settings(settings_env: Path) -> Settings:
    return make_settings(settings_env / "data")


def test_plain_host_uses_mem_available_minus_head_room(tmp_path: Path, settings: Settings) -> None:
    paths = host(tmp_path, {"meminfo": meminfo(8 * 1024 * 1024), "cpuinfo": CPUINFO_8})
    totals = measure_totals(settings, paths)
    assert totals.memory_bytes == 8 * GIB - (8 * GIB) // 10
    assert totals.cpu_mcpus == 8000


def test_cgroup_v1_limits_clamp(tmp_path: Path, settings: Settings) -> None:
    paths = host(
        tmp_path,
        {
            "meminfo": meminfo(8 * 1024 * 1024),
            "cpuinfo": CPUINFO_8,
            "cgroup_v1_memory_limit": str(4 * GIB),
            "cgroup_v1_cfs_quota": "250000\n",
            "cgroup_v1_cfs_period": "100000\n",
        },
    )
    totals = measure_totals(settings, paths)
    assert totals.memory_bytes == 4 * GIB - (4 * GIB) // 10
    assert totals.cpu_mcpus == 2500


def test_cgroup_v1_unlimited_and_no_quota_are_ignored(tmp_path: Path, settings: Settings) -> None:
    paths = host(
        tmp_path,
        {
            "meminfo": meminfo(8 * 1024 * 1024),
            "cpuinfo": CPUINFO_8,
            "cgroup_v1_memory_limit": "9223372036854771712",
            "cgroup_v1_cfs_quota": "-1",
            "cgroup_v1_cfs_period": "100000",
        },
    )
    totals = measure_totals(settings, paths)
    assert totals.memory_bytes == 8 * GIB - (8 * GIB) // 10
    assert totals.cpu_mcpus == 8000


def test_cgroup_v2_limits_clamp(tmp_path: Path, settings: Settings) -> None:
    paths = host(
        tmp_path,
        {
            "meminfo": meminfo(8 * 1024 * 1024),
            "cpuinfo": CPUINFO_8,
            "cgroup_v2_memory_max": f"{3 * GIB}\n",
            "cgroup_v2_cpu_max": "150000 100000\n",
        },
    )
    totals = measure_totals(settings, paths)
    assert totals.memory_bytes == 3 * GIB - (3 * GIB) // 10
    assert totals.cpu_mcpus == 1500


def test_cgroup_v2_max_means_no_limit(tmp_path: Path, settings: Settings) -> None:
    paths = host(
        tmp_path,
        {
            "meminfo": meminfo(2 * 1024 * 1024),
            "cpuinfo": CPUINFO_8,
            "cgroup_v2_memory_max": "max\n",
            "cgroup_v2_cpu_max": "max 100000\n",
        },
    )
    totals = measure_totals(settings, paths)
    assert totals.memory_bytes == 2 * GIB - HEAD_ROOM_MIN_BYTES  # 10 % < 256 MiB floor
    assert totals.cpu_mcpus == 8000


def test_head_room_is_capped_at_5_gib(tmp_path: Path, settings: Settings) -> None:
    paths = host(tmp_path, {"meminfo": meminfo(100 * 1024 * 1024), "cpuinfo": CPUINFO_8})
    assert measure_totals(settings, paths).memory_bytes == 100 * GIB - HEAD_ROOM_MAX_BYTES


def test_settings_clamp_both_totals(tmp_path: Path, settings_env: Path) -> None:
    paths = host(tmp_path, {"meminfo": meminfo(8 * 1024 * 1024), "cpuinfo": CPUINFO_8})
    settings = make_settings(
        settings_env / "data", max_total_memory_bytes=GIB, max_total_cpu_mcpus=1500
    )
    totals = measure_totals(settings, paths)
    assert (totals.memory_bytes, totals.cpu_mcpus) == (GIB, 1500)


def test_meminfo_in_mb_and_missing_line(tmp_path: Path, settings: Settings) -> None:
    paths = host(tmp_path, {"meminfo": "MemAvailable: 4096 MB\n", "cpuinfo": CPUINFO_8})
    assert measure_totals(settings, paths).memory_bytes == 4 * GIB - (4 * GIB) // 10
    paths.meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(ConfigError, match="MemAvailable"):
        measure_totals(settings, paths)


def test_missing_cpuinfo_falls_back_to_cpu_count(tmp_path: Path, settings: Settings) -> None:
    paths = host(tmp_path, {"meminfo": meminfo(8 * 1024 * 1024)})
    assert measure_totals(settings, paths).cpu_mcpus >= 1000


def test_from_host_reads_real_files(settings: Settings) -> None:
    totals = ResourceTracker.from_host(settings).totals
    assert totals.memory_bytes > 0
    assert totals.cpu_mcpus > 0


# ----------------------------------------------------------------- tokens


def test_tokens_account_and_close_is_idempotent() -> None:
    t = tracker(1024, 2000)
    token = t.try_acquire(512, 1000)
    assert token is not None
    stats = t.statistics()
    assert (stats.memory_used_bytes, stats.cpu_used_mcpus, stats.tokens) == (512 * MIB, 1000, 1)
    token.close()
    token.close()
    stats = t.statistics()
    assert (stats.memory_used_bytes, stats.cpu_used_mcpus, stats.tokens) == (0, 0, 0)
    assert token.closed


def test_try_acquire_when_full_and_shortfall() -> None:
    t = tracker(1024, 2000)
    held = t.try_acquire(900, 1500)
    assert held is not None
    assert t.try_acquire(200, 100) is None
    assert t.shortfall(200, 1000) == Shortfall(memory_mb=76, cpu_mcpus=500)
    assert t.shortfall(10, 10) == Shortfall(0, 0)


def test_impossible_request_is_rejected_at_once() -> None:
    t = tracker(1024, 2000)
    with pytest.raises(ResourceTooBig, match=r"needs 2048 MB of memory, more than this worker "
                       r"has in all \(1024 MB\)$"):  # fmt: skip
        t.try_acquire(2048, 0)  # what does fit (no CPU asked) is not named
    with pytest.raises(ResourceTooBig, match=r"needs 2001 mCPU, .* in all \(2000 mCPU\)$"):
        t.try_acquire(0, 2001)
    assert t.too_big(4096, 4000) == (
        "needs 4096 MB of memory and 4000 mCPU, more than this worker has in all "
        "(1024 MB, 2000 mCPU)"
    )
    assert t.is_possible(1024, 2000)


async def test_impossible_blocking_request_is_rejected_at_once() -> None:
    with pytest.raises(ResourceTooBig):
        await tracker(1024, 2000).acquire(4096, 0)


async def test_blocking_acquire_wakes_on_release() -> None:
    t = tracker(1024, 2000)
    held = t.try_acquire(1024, 0)
    assert held is not None
    waiter = asyncio.create_task(t.acquire(512, 0))
    await asyncio.sleep(0)
    assert not waiter.done()
    held.close()
    token = await asyncio.wait_for(waiter, 1)
    assert token.memory_mb == 512


async def test_blocking_acquire_times_out_without_leaking() -> None:
    t = tracker(1024, 2000)
    held = t.try_acquire(1024, 0)
    assert held is not None
    with pytest.raises(TimeoutError):
        await t.acquire(512, 0, timeout_s=0.02)
    assert t.statistics().tokens == 1


async def test_reserve_releases_on_exit() -> None:
    t = tracker(1024, 2000)
    async with t.reserve(256, 500) as token:
        assert t.statistics().memory_used_bytes == 256 * MIB
        assert not token.closed
    assert token.closed
    assert t.statistics().memory_used_bytes == 0


async def test_wait_async_resource_uses_80_percent_marks() -> None:
    t = tracker(1000, 1000)
    assert await t.wait_async_resource(0.01)
    memory = t.try_acquire(800, 0)  # exactly 80 % of memory: not below the mark
    assert memory is not None
    assert not await t.wait_async_resource(0.02)
    waiter = asyncio.create_task(t.wait_async_resource(5))
    await asyncio.sleep(0)
    assert not waiter.done()
    memory.close()
    assert await asyncio.wait_for(waiter, 1)
    cpu = t.try_acquire(0, 800)
    assert cpu is not None
    assert not await t.wait_async_resource(0.01)


async def test_room_lent_to_idle_containers_does_not_count_once_told() -> None:
    t = tracker(1000, 1000)
    held = t.try_acquire(900, 900)
    assert held is not None
    lent = [0, 0]
    assert not await t.wait_async_resource(0.02, lambda: (lent[0], lent[1]))
    waiter = asyncio.create_task(t.wait_async_resource(5, lambda: (lent[0], lent[1])))
    await asyncio.sleep(0)
    lent[0] = 900  # the memory is idle now, the CPU not yet
    t.lent_changed()
    await asyncio.sleep(0)
    assert not waiter.done()
    lent[1] = 200
    t.lent_changed()
    assert await asyncio.wait_for(waiter, 1)
    assert not await t.wait_async_resource(0.01)  # counted without ``lent``


# ------------------------------------------------------------------ tickets


def full(t: ResourceTracker, *memory_mb: int) -> list[ResourceToken]:
    """Tokens of these sizes, taken now."""
    tokens = [t.try_acquire(mb, 0) for mb in memory_mb]
    assert all(token is not None for token in tokens)
    return [token for token in tokens if token is not None]


async def test_a_ticket_that_fits_is_granted_at_once() -> None:
    t = tracker(1024, 2000)
    ticket = t.request(512, 1000)
    assert ticket.granted.is_set() and not ticket.waiting
    token = ticket.take()
    assert token is not None and (token.memory_mb, token.cpu_mcpus) == (512, 1000)
    assert ticket.take() is None
    assert t.statistics().tokens == 1 and t.waiting == 0


async def test_room_goes_to_the_waiting_tickets_in_the_order_they_came() -> None:
    t = tracker(256, 2000)
    one, two = full(t, 128, 128)
    first, second = t.request(128, 0), t.request(128, 0)
    assert first.waiting and second.waiting
    one.close()
    assert first.granted.is_set() and second.waiting
    assert t.try_acquire(128, 0) is None  # the newcomer finds no room
    two.close()
    assert second.granted.is_set()
    assert t.waiting == 0 and t.statistics().memory_used_bytes == 256 * MIB


async def test_a_ticket_that_does_not_fit_yet_lets_a_smaller_one_go_ahead() -> None:
    t = tracker(256, 2000)
    one, _ = full(t, 128, 128)
    big, small = t.request(256, 0), t.request(128, 0)
    one.close()
    assert small.granted.is_set() and big.waiting


async def test_a_function_without_a_container_goes_first_the_longest_starving_first() -> None:
    t = tracker(128, 2000)
    (one,) = full(t, 128)
    growth, late, early = t.request(128, 0), t.request(128, 0), t.request(128, 0)
    late.starving_since, early.starving_since = 20.0, 10.0
    one.close()
    assert early.granted.is_set() and late.waiting and growth.waiting
    token = early.take()
    assert token is not None
    token.close()
    assert late.granted.is_set() and growth.waiting


async def test_room_handed_to_an_heir_is_held_for_it_alone() -> None:
    t = tracker(256, 2000)
    one, two = full(t, 128, 128)
    older = t.request(128, 0)  # came first: without the heir, it would take the room
    heir = t.request(256, 0)
    one.close(heir=heir)
    assert older.waiting and heir.waiting and (heir.held_mb, heir.held_mcpus) == (128, 0)
    assert t.statistics().memory_used_bytes == 256 * MIB
    assert t.shortfall(256, 0, heir).memory_mb == 128
    assert t.promised() == (128, 0, 0)
    two.close(heir=heir)
    assert heir.granted.is_set() and older.waiting
    assert t.promised() == (256, 0, 1)  # granted, not taken yet
    token = heir.take()
    assert token is not None and token.memory_mb == 256
    stats = t.statistics()
    assert (stats.memory_used_bytes, stats.tokens) == (256 * MIB, 1)
    assert t.promised() == (0, 0, 0)


async def test_room_held_beyond_the_request_goes_back_to_the_line() -> None:
    t = tracker(256, 2000)
    (whole,) = full(t, 256)
    other = t.request(128, 0)
    heir = t.request(128, 0)
    whole.close(heir=heir)
    assert heir.granted.is_set() and other.granted.is_set()


async def test_a_withdrawn_heir_gives_its_held_room_to_the_line() -> None:
    t = tracker(256, 2000)
    one, _ = full(t, 128, 128)
    other = t.request(128, 0)
    heir = t.request(256, 0)
    one.close(heir=heir)
    assert other.waiting
    heir.withdraw()
    assert other.granted.is_set() and t.waiting == 0
    heir.withdraw()  # idempotent
    one.close(heir=heir)  # so is closing the token
    assert t.statistics().memory_used_bytes == 256 * MIB


async def test_room_for_an_heir_that_no_longer_waits_goes_to_the_line() -> None:
    t = tracker(128, 2000)
    (one,) = full(t, 128)
    gone, other = t.request(128, 0), t.request(128, 0)
    gone.withdraw()
    one.close(heir=gone)
    assert other.granted.is_set()


async def test_withdrawing_a_granted_ticket_closes_its_token() -> None:
    t = tracker(256, 2000)
    (one,) = full(t, 256)
    ticket, other = t.request(256, 0), t.request(256, 0)
    one.close()
    assert ticket.granted.is_set()
    ticket.withdraw()
    assert other.granted.is_set()
    stats = t.statistics()
    assert (stats.memory_used_bytes, stats.tokens) == (256 * MIB, 1)


async def test_on_grant_is_called_for_a_later_grant_only() -> None:
    t = tracker(256, 2000)
    calls: list[str] = []
    at_once = t.request(256, 0, lambda: calls.append("at once"))
    assert at_once.granted.is_set() and calls == []
    later = t.request(128, 0, lambda: calls.append("later"))
    token = at_once.take()
    assert token is not None
    token.close()
    assert later.granted.is_set() and calls == ["later"]


async def test_impossible_ticket_is_rejected_at_once() -> None:
    with pytest.raises(ResourceTooBig):
        tracker(1024, 2000).request(4096, 0)


async def test_blocking_acquirers_are_served_in_the_order_they_came() -> None:
    t = tracker(128, 2000)
    (held,) = full(t, 128)
    first = asyncio.create_task(t.acquire(128, 0))
    await asyncio.sleep(0)
    second = asyncio.create_task(t.acquire(128, 0))
    await asyncio.sleep(0)
    held.close()
    assert t.try_acquire(128, 0) is None  # granted to the first already: no race for it
    token = await asyncio.wait_for(first, 1)
    assert not second.done()
    token.close()
    (await asyncio.wait_for(second, 1)).close()
    assert t.statistics().tokens == 0 and t.waiting == 0
