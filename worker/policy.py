"""What the worker does with a call once the agent has answered.

The agent returns an :class:`~config.domain.Outcome`; this module turns it,
with the function's retry policy and the attempt number, into one
:class:`Decision`. It is pure: no I/O, no clock, the random source injected.

=========================  ================================================
outcome                    decision
=========================  ================================================
success                    FINISH (record, ack)
busy (never started, or    RELEASE after a short delay
stopped by shutdown)
terminal                   FINISH as error, and DEAD-letter the message
cancelled / expired        FINISH as cancelled
function error / timeout   RETRY after backoff while attempts remain,
                           else FINISH and DEAD-letter
=========================  ================================================

An attempt counts (``Decision.counted``: the record's ``attempts``, what
``max_attempts`` bounds) when the call ran in a container, whatever its end
(a run the worker's shutdown stopped too: the function ran), or when its
function's container failed to start (the function's own fault, retried like
a failed run), or did not accept the call's connection within its timeout
(the stuck container is replaced). A call that never reached a container for
any other reason (busy, missing image, too big for the worker, cancelled
while it waited) counts none. Only failures end a call for good once its attempts reach
``max_attempts``: a run stopped by shutdown is released to run again
whatever its count, so a call whose last allowed run was stopped runs once
more, and its record then shows more attempts than ``max_attempts``.

Backoff for function failures is exponential with full jitter between half
and the whole step: ``base * 2**(attempt-1) * U(0.5, 1.0)``, capped at
:data:`MAX_BACKOFF_S`. The default policy (3 attempts, 2 s base) gives a
transient fault (a neighbour's memory pressure, a restarted engine) two more
chances within about ten seconds, and bounds a deterministic failure to three
runs; it is the same count AWS Lambda uses for asynchronous invocations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from config.domain import CallStatus, FailureKind, Function, Outcome

MAX_BACKOFF_S = 300.0
BUSY_DELAY_S = 1.0


class Action(StrEnum):
    FINISH = "finish"  # record the final state, ack
    RETRY = "retry"  # record the failed attempt, hand the message back after a delay
    RELEASE = "release"  # not started (no attempt charged), or stopped: hand back


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    dead_letter: bool = False  # FINISH only: also park the message with the dead letters
    counted: bool = True  # this attempt counts among the call's attempts (see above)

    @property
    def final(self) -> bool:
        return self.action is Action.FINISH


def backoff_s(base_s: float, attempt: int, rng: random.Random) -> float:
    step = min(MAX_BACKOFF_S, base_s * float(2 ** max(0, attempt - 1)))
    return step * rng.uniform(0.5, 1.0)


def decide(outcome: Outcome, fn: Function, attempt: int, rng: random.Random) -> Decision:
    """The next step for a call whose ``attempt``-th run (1-based) gave ``outcome``."""
    if outcome.status is CallStatus.SUCCESS:
        return Decision(Action.FINISH)
    if outcome.failure is FailureKind.BUSY:  # never started, or stopped by shutdown
        delay_s = BUSY_DELAY_S * rng.uniform(0.5, 1.5)
        return Decision(Action.RELEASE, delay_s=delay_s, counted=outcome.started)
    if outcome.failure is FailureKind.TERMINAL:
        return Decision(Action.FINISH, dead_letter=True, counted=outcome.started)
    if outcome.status is CallStatus.CANCELLED or outcome.failure is FailureKind.CANCELLED:
        return Decision(Action.FINISH, counted=outcome.started)
    if attempt < fn.max_attempts:
        return Decision(Action.RETRY, delay_s=backoff_s(fn.retry_backoff_s, attempt, rng))
    return Decision(Action.FINISH, dead_letter=True)
