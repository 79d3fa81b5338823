"""The worker's decision table."""

from __future__ import annotations

import dataclasses
import random

import pytest

from config.domain import CallStatus, FailureKind, Function, Outcome, utcnow
from worker.policy import MAX_BACKOFF_S, Action, backoff_s, decide

FN = Function(app="a", name="f", image="img", max_attempts=3, retry_backoff_s=2.0)


def out(status: CallStatus, failure: FailureKind | None = None) -> Outcome:
    return Outcome(status=status, failure=failure, error=None if failure is None else "x")


def test_success_finishes_without_dead_letter() -> None:
    d = decide(out(CallStatus.SUCCESS), FN, 1, random.Random(1))
    assert d.action is Action.FINISH and not d.dead_letter


def test_busy_is_released_without_charging_an_attempt() -> None:
    d = decide(out(CallStatus.ERROR, FailureKind.BUSY), FN, 3, random.Random(1))
    assert d.action is Action.RELEASE and not d.counted
    assert 0.5 <= d.delay_s <= 1.5


def test_terminal_finishes_and_dead_letters_on_first_attempt() -> None:
    d = decide(out(CallStatus.ERROR, FailureKind.TERMINAL), FN, 1, random.Random(1))
    assert d.action is Action.FINISH and d.dead_letter


def test_cancelled_finishes() -> None:
    d = decide(out(CallStatus.CANCELLED, FailureKind.CANCELLED), FN, 1, random.Random(1))
    assert d.action is Action.FINISH and not d.dead_letter


@pytest.mark.parametrize("status", [CallStatus.ERROR, CallStatus.TIMEOUT])
def test_function_failures_retry_until_attempts_run_out(status: CallStatus) -> None:
    rng = random.Random(7)
    first = decide(out(status, FailureKind.FUNCTION), FN, 1, rng)
    second = decide(out(status, FailureKind.FUNCTION), FN, 2, rng)
    last = decide(out(status, FailureKind.FUNCTION), FN, 3, rng)
    assert first.action is Action.RETRY and 1.0 <= first.delay_s <= 2.0
    assert second.action is Action.RETRY and 2.0 <= second.delay_s <= 4.0
    assert last.action is Action.FINISH and last.dead_letter


def test_only_a_call_that_reached_its_container_or_failed_starting_it_counts() -> None:
    def ran(outcome: Outcome) -> Outcome:
        return dataclasses.replace(outcome, started_at=utcnow(), completed_at=utcnow())

    cases = [
        (ran(Outcome(CallStatus.SUCCESS)), True),
        (ran(Outcome(CallStatus.ERROR, "crashed", FailureKind.FUNCTION)), True),
        (Outcome(CallStatus.ERROR, "init failed", FailureKind.FUNCTION), True),
        (ran(Outcome(CallStatus.ERROR, "too large", FailureKind.TERMINAL)), True),
        (ran(Outcome(CallStatus.CANCELLED, "on request", FailureKind.CANCELLED)), True),
        (Outcome(CallStatus.ERROR, "image not found", FailureKind.TERMINAL), False),
        (Outcome(CallStatus.ERROR, "too big", FailureKind.TERMINAL), False),
        (Outcome(CallStatus.CANCELLED, "while waiting", FailureKind.CANCELLED), False),
        (Outcome(CallStatus.ERROR, "no room", FailureKind.BUSY), False),
        # The function ran until the worker's shutdown stopped it: that run counts.
        (ran(Outcome(CallStatus.ERROR, "worker stopped", FailureKind.BUSY)), True),
    ]
    rng = random.Random(5)
    assert [decide(o, FN, 1, rng).counted for o, _ in cases] == [c for _, c in cases]


def test_a_run_stopped_by_shutdown_runs_again_whatever_its_count() -> None:
    """Only failures end a call for good: a call whose last allowed run was stopped
    runs once more (its record then shows one attempt over max_attempts)."""
    stopped = Outcome(CallStatus.ERROR, "worker stopped", FailureKind.BUSY, started_at=utcnow())
    d = decide(stopped, FN, FN.max_attempts, random.Random(2))
    assert d.action is Action.RELEASE and d.counted


def test_backoff_is_capped() -> None:
    rng = random.Random(3)
    assert all(backoff_s(10.0, 30, rng) <= MAX_BACKOFF_S for _ in range(100))
