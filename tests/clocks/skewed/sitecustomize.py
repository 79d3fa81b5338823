"""Test-only: the wall clock of a process started with this directory on PYTHONPATH
is off, as another host's may be (tests/clocks).

``FNQ_TEST_CLOCK_SKEW_S``: seconds added to ``time.time`` and ``time.time_ns`` from
the start (negative: behind). ``FNQ_TEST_CLOCK_STEP_S`` and ``FNQ_TEST_CLOCK_STEP_FILE``:
once that file exists, the clock steps by that many seconds more, as an NTP
correction steps it. The monotonic clock is left alone, as a step leaves it.
"""

from __future__ import annotations

import os
import time

_SKEW_NS = int(float(os.environ.get("FNQ_TEST_CLOCK_SKEW_S", "0")) * 1e9)
_STEP_NS = int(float(os.environ.get("FNQ_TEST_CLOCK_STEP_S", "0")) * 1e9)
_STEP_FILE = os.environ.get("FNQ_TEST_CLOCK_STEP_FILE", "")
_LOOK_EVERY_NS = 20_000_000  # how often the step file is looked for, at most

_real_ns = time.time_ns
_monotonic_ns = time.monotonic_ns
_state = {"offset": _SKEW_NS, "look_at": 0}


def _offset_ns() -> int:
    if _STEP_NS and _STEP_FILE and _state["look_at"] >= 0:
        now = _monotonic_ns()
        if now >= _state["look_at"]:
            _state["look_at"] = now + _LOOK_EVERY_NS
            if os.path.exists(_STEP_FILE):
                _state["offset"] += _STEP_NS
                _state["look_at"] = -1  # stepped: once only
    return _state["offset"]


def _time_ns() -> int:
    return _real_ns() + _offset_ns()


def _time() -> float:
    return _time_ns() / 1e9


if _SKEW_NS or (_STEP_NS and _STEP_FILE):
    time.time_ns = _time_ns
    time.time = _time
