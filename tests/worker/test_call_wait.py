"""``fnq call --wait`` against a real worker: the answer, or why there is none."""

from __future__ import annotations

import pytest

from config.domain import Function
from tests.worker.conftest import Cluster
from worker.cli._common import EXIT_FAILED, EXIT_TIMED_OUT

pytestmark = pytest.mark.integration


async def test_call_wait_prints_the_answer_or_why_there_is_none(sqlite_cluster: Cluster) -> None:
    for fn in (
        Function(app="t", name="hello", image="fnq/example:latest", memory_mb=64),
        Function(
            app="t", name="hi", image="fnq/example:latest", memory_mb=64, config={"GREETING": "Hi"}
        ),
        Function(app="t", name="raise", image="fnq/raise:latest", memory_mb=64, max_attempts=1),
        Function(app="t", name="sleep", image="fnq/sleep:latest", memory_mb=64, timeout_s=30),
        Function(app="t", name="gone", image="fnq/no-such-image:latest", memory_mb=64),
    ):
        await sqlite_cluster.register(fn)
    sqlite_cluster.start_worker()

    done = sqlite_cluster.fnq("call", "t", "hello", "--body", '{"name": "Ada"}', "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, '{"message": "Hello, Ada!"}', "")
    # the README's `--config GREETING=hi`: a function's config is its environment
    done = sqlite_cluster.fnq("call", "t", "hi", "--body", '{"name": "Ada"}', "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, '{"message": "Hi, Ada!"}', "")

    failed = sqlite_cluster.fnq("call", "t", "raise", "--body", "boom", "--wait", "--id", "r-1")
    assert failed.returncode == EXIT_FAILED and failed.stdout == ""
    assert failed.stderr.startswith("fnq: call r-1 ended error: function failed")
    assert "`fnq logs r-1`" in failed.stderr

    never = sqlite_cluster.fnq("call", "t", "gone", "--wait", "--id", "g-1")
    assert never.returncode == EXIT_FAILED and never.stdout == ""
    assert never.stderr.startswith("fnq: call g-1 ended error: image fnq/no-such-image:latest")
    assert never.stderr.endswith(" (it never ran)\n"), never.stderr  # no log to point at

    late = sqlite_cluster.fnq("call", "t", "sleep", "--body", "5", "--wait",
                              "--wait-timeout", "0.5", "--id", "s-1")  # fmt: skip
    assert late.returncode == EXIT_TIMED_OUT and late.stdout == ""
    assert "call s-1 has not ended after 0.5 s" in late.stderr
    again = sqlite_cluster.fnq("calls", "wait", "s-1", "--timeout", "30")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[:2] == ["s-1", "success"]
