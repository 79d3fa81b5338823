"""The log of a spell of shortage on the host: once as it begins, once as it ends.
And the count of the containers that must go for the worker's descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections.abc import Iterator

import pytest

from worker.agent.drivers import shortage as shortage_module
from worker.agent.drivers.shortage import ShortageLog
from worker.agent.errors import HostShort

SHORT = HostShort("the worker's host ran out of resources while starting a container: EMFILE")


async def lines_after(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    """The log's lines once there are ``count`` of them (at most 5 s)."""
    async with asyncio.timeout(5):
        while len(caplog.records) < count:
            await asyncio.sleep(0.01)
    return [r.getMessage() for r in caplog.records]


async def test_a_spell_at_the_edge_of_a_limit_is_one_begin_and_one_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures and successes alternate while descriptors come and go: no line for
    each; the end is told once nothing has failed for QUIET_S, even when nothing
    works after that."""
    monkeypatch.setattr(shortage_module, "QUIET_S", 0.2)
    caplog.set_level(logging.WARNING)
    log = ShortageLog(logging.getLogger("fnq.test.shortage"))
    for _ in range(5):
        log.failed(SHORT)
        log.worked()
    assert [r.getMessage() for r in caplog.records] == [
        f"{SHORT}; calls that need a new container or connection go back to the queue "
        "until the host has room again"
    ]
    assert log.short and log.failures == 5
    lines = await lines_after(caplog, 2)
    assert lines[1].startswith("the host has room for containers again after ")
    assert lines[1].endswith("(5 start(s) or connection(s) failed meanwhile)")
    assert not log.short
    log.close()


async def test_a_failure_after_the_last_success_keeps_the_spell(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shortage_module, "QUIET_S", 0.05)
    caplog.set_level(logging.WARNING)
    log = ShortageLog(logging.getLogger("fnq.test.shortage"))
    log.failed(SHORT)
    log.worked()
    log.failed(SHORT)  # the look at the end of QUIET_S finds this: not over
    lines = await lines_after(caplog, 1)
    await asyncio.sleep(0.1)  # past QUIET_S: the look has been and found the failure
    assert len(caplog.records) == 1, lines
    assert log.short
    log.worked()
    lines = await lines_after(caplog, 2)
    assert lines[1].startswith("the host has room for containers again")
    log.close()


async def test_a_long_spell_is_told_again_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shortage_module, "REMIND_S", 0.0)
    caplog.set_level(logging.WARNING)
    log = ShortageLog(logging.getLogger("fnq.test.shortage"))
    log.failed(SHORT)
    log.failed(SHORT)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].startswith("the host is still short of resources for containers: 1 more ")
    log.close()


@contextlib.contextmanager
def soft_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("left", "containers"), [(16, 0), (15, 1), (5, 1), (4, 2), (0, 2)])
def test_containers_in_the_way_of_a_start_by_the_descriptors_missing(
    left: int, containers: int
) -> None:
    """A start needs 16 descriptors; each idle container that goes gives back 11."""
    in_use = len(os.listdir("/proc/self/fd"))  # with the one listing them, as counted
    with soft_limit(in_use + left):
        assert shortage_module.containers_in_the_way() == containers


def test_a_limit_well_above_the_descriptor_table_is_not_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No descriptor is past the table's size: with the limit far enough above it, no
    list of the open ones is made (it takes time on the event loop)."""
    table = shortage_module._table_size()
    assert table is not None and table >= len(os.listdir("/proc/self/fd"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < table + 16:
        pytest.skip(f"the hard limit of open files ({hard}) is too low")

    def listed(path: str) -> list[str]:
        raise AssertionError(f"{path} was listed")

    with soft_limit(table + 16):
        monkeypatch.setattr(os, "listdir", listed)
        assert shortage_module.descriptors_left(16) == 16
        assert shortage_module.containers_in_the_way() == 0
        shortage_module.check_descriptors()
