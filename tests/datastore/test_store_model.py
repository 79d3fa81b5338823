"""Model-based tests of the datastore: random sequences of operations on each backend,
compared after every step with an in-memory model of docs/datastore.md.

The operations: record_queued, record_running, record_outcome and record_retry (alone,
and several at once in one group commit), request_cancel, end_buried, retry_call,
reopen_call, purge_calls, list_calls (every page of a filter, calls queued between
pages), count_by_status, cancel_requested, wait_for_calls, and the function registry.
After each step every record (all fields, the request and the log), the full listing
and the registry must be the model's. Times the store takes as "now" are checked to
lie within the call that wrote them.

Each backend, with logs in the datastore and in files, gets one store per test; every
example starts from empty tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from config.domain import (
    FINAL_STATUSES,
    Call,
    CallStatus,
    FailureKind,
    Function,
    Outcome,
    Response,
    frozen_map,
    utcnow,
)
from config.settings import load_settings
from datastore import wait
from datastore.base import (
    LIST_LIMIT_MAX,
    CallFilter,
    CallRecord,
    bound_log,
    decode_cursor,
    open_datastore,
)
from datastore.common import SqlDatastore
from datastore.errors import (
    CallNotFinal,
    CallNotFound,
    FunctionExists,
    FunctionNotFound,
    InvalidFunction,
    RequestNotStored,
)
from datastore.recording import CANCELLED_BY_REQUEST

pytestmark = pytest.mark.integration

MAX_RESPONSE = 300
MAX_LOG = 400
MAX_REQUEST = 64
SLACK = timedelta(milliseconds=2)  # a time the store took as "now" lies within the call
DEFAULT_ERRORS = {
    CallStatus.ERROR: "The call failed.",
    CallStatus.TIMEOUT: "The call ran past its function's timeout.",
    CallStatus.CANCELLED: "The call was cancelled.",
}
LIVE = (CallStatus.QUEUED, CallStatus.RUNNING)
FAR = datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)


@dataclass(frozen=True)
class When:
    """A time the model knows exactly (lo == hi) or only as the span of a call."""

    lo: datetime
    hi: datetime

    @staticmethod
    def at(t: datetime) -> When:
        return When(t, t)

    def holds(self, t: datetime | None) -> bool:
        if t is None:
            return False
        if self.lo == self.hi:
            return t == self.lo
        return self.lo - SLACK <= t <= self.hi + SLACK


@dataclass
class Rec:
    """The model's call record."""

    id: str
    app: str
    fn: str
    created_at: datetime
    status: CallStatus
    updated_at: When | None = None  # set by every write that changes the record
    image: str | None = None
    error: str | None = None
    failure: FailureKind | None = None
    attempts: int = 0
    started_at: When | None = None
    completed_at: When | None = None
    next_try_at: datetime | None = None
    worker_id: str | None = None
    container_id: str | None = None
    response_status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes = b""
    response_truncated: bool = False
    log_truncated: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    cancel_requested: bool = False
    request: tuple[bytes, dict[str, str], int] | None = None
    log: bytes | None = None

    @property
    def key(self) -> tuple[datetime, str]:
        return self.created_at, self.id


def request_of(call: Call) -> tuple[bytes, dict[str, str], int] | None:
    if len(call.body) > MAX_REQUEST:
        return None  # too big to run again: not stored
    return call.body, dict(call.headers), call.priority


def storable(text: str | None) -> str | None:
    """Text as every backend stores it: NUL and lone surrogates as U+FFFD."""
    return None if text is None else re.sub("[\x00\ud800-\udfff]", "\ufffd", text)


def check_time(what: str, want: When | None, got: datetime | None) -> None:
    if want is None:
        assert got is None, f"{what}: {got} stored, none expected"
    else:
        assert want.holds(got), f"{what}: {got} stored, expected {want}"


def check_record(want: Rec, got: CallRecord, *, with_body: bool) -> None:
    """``got`` as the store gave it is the model's record (the request body only if read)."""
    assert got.id == want.id
    plain = ("app", "fn", "created_at", "status", "image", "error", "failure", "attempts",
             "next_try_at", "worker_id", "container_id", "response_status", "response_body",
             "response_truncated", "log_truncated", "cancel_requested")  # fmt: skip
    for name in plain:
        assert getattr(got, name) == getattr(want, name), (
            f"{want.id}.{name}: {getattr(got, name)!r} stored, model {getattr(want, name)!r}"
        )
    assert dict(got.response_headers) == want.response_headers
    assert dict(got.stats) == want.stats
    check_time(f"{want.id}.started_at", want.started_at, got.started_at)
    check_time(f"{want.id}.completed_at", want.completed_at, got.completed_at)
    check_time(f"{want.id}.updated_at", want.updated_at, got.updated_at)
    if want.request is None:
        assert not got.has_request and got.request_body is None
    else:
        body, headers, priority = want.request
        assert got.has_request
        assert (dict(got.request_headers), got.request_priority) == (headers, priority)
        assert got.request_body == (body if with_body else None)


# ------------------------------------------------------------------ strategies

APPS = ("shop", "blog")
FNS = ("resize", "crop")
WORKERS = ("w1", "w2")
FINALS = sorted(FINAL_STATUSES)

ids = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("0AZaz"),
    st.text("09AZaz_.:-", max_size=3),
)
payloads = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"", "h\u00e9llo\n".encode(), b"\xff\xfe\x00"]),
    st.integers(1, 3).map(lambda n: bytes(range(256)) * n),  # large and binary
)
headers = st.dictionaries(st.sampled_from(["X-A", "Content-Type", "x-\u00e9"]),
                          st.text(max_size=8), max_size=2)  # fmt: skip
errors = st.none() | st.sampled_from(["boom", "a\x00b", "", "fail \u00e9", "out: \udcff"])
responses = st.none() | st.builds(
    Response,
    status=st.sampled_from([200, 404, 500]),
    headers=headers.map(frozen_map),
    body=payloads,
    truncated=st.booleans(),
)


@st.composite
def outcomes(draw: st.DrawFn, statuses: list[CallStatus], t0: datetime) -> Outcome:
    started = draw(st.none() | st.sampled_from([-200, -70, 0]))
    log = draw(payloads)
    completed = draw(st.none() | st.sampled_from([-180, -60, 60]))
    micros = timedelta(microseconds=draw(st.integers(0, 999_999)))
    return Outcome(
        status=draw(st.sampled_from(statuses)),
        error=draw(errors),
        failure=draw(st.none() | st.sampled_from(list(FailureKind))),
        response=draw(responses),
        log=log,
        log_truncated=bool(log) and draw(st.booleans()),  # the agent cut a log it had
        container_id=draw(st.none() | st.just("c-1")),
        image=draw(st.none() | st.sampled_from(["shop/resize:2", "img:9"])),
        started_at=None if started is None else t0 + timedelta(minutes=started) + micros,
        completed_at=None if completed is None else t0 + timedelta(minutes=completed) + micros,
        stats=frozen_map(draw(st.dictionaries(st.just("cpu_ms"), st.just(1.5)))),  # type: ignore[arg-type]
    )


# Function fields: values each side of the documented limits, with whether each is good.
FN_VALUES: dict[str, list[tuple[Any, bool]]] = {
    "image": [("shop/resize:1.4", True), ("registry.example.com:5000/t/f:latest", True),
              ("Bad Image!", False), ("", False)],
    "memory_mb": [(6, True), (128, True), (8192, True), (5, False), (0, False), (8193, False)],
    "cpus_mcpu": [(0, True), (256000, True), (-1, False), (256001, False)],
    "timeout_s": [(1, True), (3600, True), (0, False), (3601, False)],
    "idle_timeout_s": [(1, True), (3600, True), (0, False), (3601, False)],
    "max_attempts": [(1, True), (100, True), (0, False), (101, False)],
    "retry_backoff_s": [(0.0, True), (2.5, True), (3600.0, True), (-0.5, False),
                        (3600.5, False)],
    "max_age_s": [(1, True), (2592000, True), (0, False), (2592001, False)],
    "tmpfs_mb": [(0, True), (64, True), (200, True), (-1, False)],  # and at most the memory
    "config": [({}, True), ({"MODE": "fast", "_X": ""}, True), ({"9BAD": "x"}, False),
               ({"MODE": "a\x00b"}, False), ({"MODE": "\u00e9t\u00e9"}, True)],
}  # fmt: skip
GOOD_NAMES = {"shop", "blog", "resize", "crop"}  # and "-bad", "x" * 65 are not


def fn_is_good(fn: Function) -> bool:
    """What docs/datastore.md says of the fields: each value's own verdict, tmpfs at most
    the memory, names of letters, digits, '_', '.', '-' (1 to 64)."""
    for name, values in FN_VALUES.items():
        value = getattr(fn, name)
        value = dict(value) if name == "config" else value
        if not next(ok for v, ok in values if v == value):
            return False
    return fn.tmpfs_mb <= fn.memory_mb and {fn.app, fn.name} <= GOOD_NAMES


@st.composite
def changes(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(FN_VALUES)), max_size=3, unique=True))
    out = {n: draw(st.sampled_from([v for v, _ in FN_VALUES[n]])) for n in names}
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.sampled_from(["colour", "created_at", "updated_at"]))] = "x"
    return out


@st.composite
def functions(draw: st.DrawFn) -> Function:
    values = {n: draw(st.sampled_from([v for v, _ in vs])) for n, vs in FN_VALUES.items()}
    values["config"] = frozen_map(values["config"])
    return Function(
        app=draw(st.sampled_from(["shop", "blog", "-bad"])),
        name=draw(st.sampled_from(["resize", "crop", "-bad", "x" * 65])),
        **values,
    )


def same_fn(got: Function, want: Function) -> None:
    fields = [f.name for f in dataclasses.fields(Function) if not f.name.endswith("_at")]
    for name in fields:
        g, w = getattr(got, name), getattr(want, name)
        assert (dict(g) if name == "config" else g) == (dict(w) if name == "config" else w), (
            f"{want.ref}.{name}: {g!r} stored, model {w!r}"
        )


# ------------------------------------------------------------------ the machine


class StoreModel(RuleBasedStateMachine):
    """Operations on ``store`` against the model. The class attributes below are set on
    a subclass per test."""

    store: SqlDatastore
    runner: asyncio.Runner
    reset: Any
    files: bool  # logs in files (FN_LOG_URL), not in the datastore

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.run(self.reset())
        self.t0 = utcnow()
        self.model: dict[str, Rec] = {}
        self.known: dict[str, Call] = {}  # every call made, recorded or not
        self.fns: dict[tuple[str, str], Function] = {}
        self.fn_times: dict[tuple[str, str], tuple[When, When]] = {}
        self.serial = 0

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def timed(self, coro: Any) -> tuple[Any, When]:
        """The result of ``coro``, and when it ran by the store's clock (datastore.clock:
        PostgreSQL's may be a few ms off this host's, more on a busy host)."""
        clock = self.store.clock
        lo = clock.now()
        result = self.run(coro)
        return result, When(lo, clock.now())

    # ------------------------------------------------------------ calls
    @initialize(target=calls)
    def first_call(self) -> str:
        return self._make(Call(id="first", app="shop", fn="resize", body=b"{}",
                               created_at=self.t0 - timedelta(minutes=2)))  # fmt: skip

    def _make(self, call: Call) -> str:
        self.known[call.id] = call
        return call.id

    @rule(target=calls, head=ids, app=st.sampled_from(APPS), fn=st.sampled_from(FNS),
          minute=st.integers(0, 4), micro=st.sampled_from([0, 0, 1, 999_999]),
          far=st.sampled_from([False] * 5 + [True]),
          body=payloads | st.just(b"x" * (MAX_REQUEST + 1)), hdrs=headers,
          priority=st.integers(0, 2))  # fmt: skip
    def new_call(self, head: str, app: str, fn: str, minute: int, micro: int, far: bool,
                 body: bytes, hdrs: dict[str, str], priority: int) -> str:  # fmt: skip
        self.serial += 1
        created = self.t0 - timedelta(minutes=minute, microseconds=micro)
        if far:  # the latest milliseconds a message may name (mq.wire: up to year 9999)
            created = FAR - timedelta(minutes=minute, milliseconds=micro % 1000)
        call_id = f"{head}{'_-'[self.serial % 2]}{self.serial}"
        call = Call(id=call_id, app=app, fn=fn, body=body, headers=frozen_map(hdrs),
                    created_at=created, priority=priority)  # fmt: skip
        return self._make(call)

    @rule(cid=calls, image=st.none() | st.just("shop/resize:1"))
    def queued(self, cid: str, image: str | None) -> None:
        call = self.known[cid]
        _, now = self.timed(self.store.record_queued(call, image))
        self._was_queued(call, image, now)

    def _was_queued(self, call: Call, image: str | None, now: When) -> None:
        cid = call.id
        if cid not in self.model:
            self.model[cid] = Rec(cid, call.app, call.fn, call.created_at, CallStatus.QUEUED,
                                  now, image=image, request=request_of(call))  # fmt: skip

    @rule(cid=calls, attempt=st.integers(0, 3), worker=st.sampled_from(WORKERS))
    def running(self, cid: str, attempt: int, worker: str) -> None:
        call = self.known[cid]
        got, now = self.timed(self.store.record_running(call, attempt, worker))
        self._was_running(call, attempt, worker, got, now)

    def _was_running(self, call: Call, attempt: int, worker: str, got: CallRecord,
                     now: When) -> None:  # fmt: skip
        cid = call.id
        rec = self.model.get(cid)
        if rec is None:
            rec = self.model[cid] = Rec(cid, call.app, call.fn, call.created_at,
                                        CallStatus.RUNNING, attempts=max(attempt, 1))  # fmt: skip
            rec.request = request_of(call)
            rec.started_at, rec.worker_id, rec.updated_at = now, worker, now
        elif rec.status in LIVE:
            rec.status, rec.updated_at = CallStatus.RUNNING, now
            rec.attempts = attempt if attempt > 0 else rec.attempts + 1
            rec.started_at, rec.worker_id = now, worker
            rec.next_try_at = rec.error = rec.failure = None  # the last attempt's
            if rec.request is None:
                rec.request = request_of(call)
        check_record(rec, got, with_body=False)  # a final record comes back untouched

    def _written(self, call: Call, outcome: Outcome, attempt: int, worker: str | None,
                 with_request: bool, now: When) -> Rec:  # fmt: skip
        """The model's record after an outcome or retry row is written."""
        rec = self.model.get(call.id)
        if rec is None:
            rec = Rec(call.id, call.app, call.fn, call.created_at, CallStatus.QUEUED)
            self.model[call.id] = rec
        rec.updated_at = now
        rec.error = storable(outcome.error) or DEFAULT_ERRORS.get(outcome.status)
        rec.failure = outcome.failure
        rec.attempts = attempt
        rec.image = outcome.image or rec.image
        rec.started_at = None if outcome.started_at is None else When.at(outcome.started_at)
        rec.worker_id = worker or rec.worker_id
        rec.container_id = outcome.container_id
        resp = outcome.response
        rec.response_status = resp.status if resp else None
        rec.response_headers = dict(resp.headers) if resp else {}
        rec.response_body = resp.body[:MAX_RESPONSE] if resp else b""
        rec.response_truncated = bool(resp and (resp.truncated or len(resp.body) > MAX_RESPONSE))
        rec.stats = dict(outcome.stats)
        if rec.request is None and (with_request or attempt == 0):
            rec.request = request_of(call)
        return rec

    def _set_log(self, rec: Rec, outcome: Outcome) -> None:
        rec.log = bound_log(outcome.log, MAX_LOG)
        rec.log_truncated = outcome.log_truncated or len(rec.log) < len(outcome.log)

    @rule(cid=calls, attempt=st.integers(0, 3), worker=st.sampled_from(WORKERS),
          with_request=st.booleans(), data=st.data())  # fmt: skip
    def outcome(self, cid: str, attempt: int, worker: str, with_request: bool,
                data: st.DataObject) -> None:  # fmt: skip
        call = self.known[cid]
        outcome = data.draw(outcomes(FINALS, self.t0))
        write = self.store.record_outcome(call, outcome, attempt, worker,
                                          with_request=with_request)  # fmt: skip
        changed, now = self.timed(write)
        self._finished(call, outcome, attempt, worker, with_request, changed, now)

    def _finished(self, call: Call, outcome: Outcome, attempt: int, worker: str,
                  with_request: bool, changed: bool, now: When) -> None:  # fmt: skip
        before = self.model.get(call.id)
        assert changed is (before is None or before.status in LIVE)
        if not changed:
            return
        rec = self._written(call, outcome, attempt, worker, with_request, now)
        rec.status = outcome.status
        rec.completed_at = now if outcome.completed_at is None else When.at(outcome.completed_at)
        rec.next_try_at = None
        self._set_log(rec, outcome)

    @rule(cid=calls, attempt=st.integers(0, 3), running_on=st.none() | st.sampled_from(WORKERS),
          with_request=st.booleans(), next_try=st.integers(0, 10**7), data=st.data())  # fmt: skip
    def retry(self, cid: str, attempt: int, running_on: str | None, with_request: bool,
              next_try: int, data: st.DataObject) -> None:  # fmt: skip
        call = self.known[cid]
        outcome = self._retry_outcome(data)
        next_try_at = self.t0 + timedelta(microseconds=next_try)
        write = self.store.record_retry(
            call, outcome, attempt, next_try_at, with_request=with_request, running_on=running_on
        )
        changed, now = self.timed(write)
        self._retried(call, outcome, attempt, next_try_at, running_on, with_request, changed, now)

    def _retry_outcome(self, data: st.DataObject) -> Outcome:
        outcome = data.draw(outcomes([CallStatus.ERROR, CallStatus.TIMEOUT], self.t0))
        if data.draw(st.booleans()):  # handed back before it started: no log of its own
            outcome = dataclasses.replace(outcome, started_at=None, log=b"", log_truncated=False)
        return outcome

    def _retried(self, call: Call, outcome: Outcome, attempt: int, next_try_at: datetime,
                 running_on: str | None, with_request: bool, changed: bool,
                 now: When) -> None:  # fmt: skip
        cid = call.id
        before = self.model.get(cid)
        applies = before is None or (
            before.status in LIVE
            and (running_on is None or (before.status is CallStatus.RUNNING
                                        and before.worker_id == running_on))
        )  # fmt: skip
        assert changed is applies
        if not changed:
            return
        cancelled = before is not None and before.cancel_requested
        rec = self._written(call, outcome, attempt, running_on, with_request, now)
        rec.status = CallStatus.CANCELLED if cancelled else CallStatus.QUEUED
        rec.completed_at = now if cancelled else None
        rec.next_try_at = None if cancelled else next_try_at
        if outcome.started_at is not None or outcome.log:
            self._set_log(rec, outcome)
        # else: the last run's log, and whether it was cut, stay

    @rule(picks=st.lists(st.tuples(st.sampled_from(["queued", "running", "outcome", "retry"]),
                                   calls, st.integers(0, 2), st.sampled_from(WORKERS),
                                   st.booleans()), min_size=2, max_size=6),
          data=st.data())  # fmt: skip
    def together(self, picks: list[tuple[str, str, int, str, bool]], data: st.DataObject) -> None:
        """Writes made at once go in one group commit (on PostgreSQL as one statement per
        kind, a call's writes in successive ones); each acts as if made in turn."""
        if self.files:
            return  # then a write first reads the record: the order is not the callers'
        writes: list[Any] = []  # what makes each write, made once every value is drawn
        later: list[Any] = []
        for kind, cid, attempt, worker, flag in picks:
            call = self.known[cid]
            if kind == "queued":
                writes.append(partial(self.store.record_queued, call, None))
                later.append(lambda _, now, call=call: self._was_queued(call, None, now))
            elif kind == "running":
                writes.append(partial(self.store.record_running, call, attempt, worker))
                later.append(lambda got, now, call=call, a=attempt, w=worker:
                             self._was_running(call, a, w, got, now))  # fmt: skip
            elif kind == "outcome":
                outcome = data.draw(outcomes(FINALS, self.t0))
                writes.append(partial(self.store.record_outcome, call, outcome, attempt, worker))
                later.append(lambda got, now, call=call, o=outcome, a=attempt, w=worker:
                             self._finished(call, o, a, w, False, got, now))  # fmt: skip
            else:
                outcome = self._retry_outcome(data)
                on = worker if flag else None
                writes.append(partial(self.store.record_retry, call, outcome, attempt, self.t0,
                                      running_on=on))  # fmt: skip
                later.append(lambda got, now, call=call, o=outcome, a=attempt, on=on:
                             self._retried(call, o, a, self.t0, on, False, got, now))  # fmt: skip

        async def at_once() -> list[Any]:
            return list(await asyncio.gather(*(make() for make in writes)))

        results, now = self.timed(at_once())
        for apply_model, result in zip(later, results, strict=True):
            apply_model(result, now)

    @rule(cid=calls | ids)
    def cancel(self, cid: str) -> None:
        got, now = self.timed(self.store.request_cancel(cid))
        rec = self.model.get(cid)
        if rec is None:
            assert got is None
            return
        if rec.status is CallStatus.QUEUED:
            rec.status, rec.failure = CallStatus.CANCELLED, FailureKind.CANCELLED
            rec.error, rec.started_at, rec.completed_at = CANCELLED_BY_REQUEST, None, now
            rec.next_try_at, rec.cancel_requested, rec.updated_at = None, True, now
        elif rec.status is CallStatus.RUNNING:
            rec.cancel_requested, rec.updated_at = True, now
        assert got is not None
        check_record(rec, got, with_body=False)

    @rule(cid=calls, reason=st.sampled_from(["buried", "a\x00b", "", "\udc80"]),
          died=st.sampled_from(["now", "long ago", "at", "just before"]))  # fmt: skip
    def end_buried(self, cid: str, reason: str, died: str) -> None:
        """The burial after every write so far, before all of them, or at the record's
        last change or a microsecond before it (its time read from the store)."""
        rec = self.model.get(cid)
        died_at = self.store.clock.now() if died == "now" else self.t0 - timedelta(days=1)
        if rec is not None and died in ("at", "just before"):
            got = self.run(self.store.get_call(cid))
            assert got is not None
            died_at = got.updated_at - timedelta(microseconds=int(died == "just before"))
        changed, now = self.timed(self.store.end_buried(cid, reason, died_at))
        applies = rec is not None and rec.status in LIVE and died in ("now", "at")
        assert changed is applies
        if rec is not None and applies:
            rec.status, rec.failure = CallStatus.ERROR, FailureKind.TERMINAL
            rec.error = storable(reason) or DEFAULT_ERRORS[CallStatus.ERROR]
            rec.completed_at, rec.next_try_at, rec.updated_at = now, None, now

    def _requeued(self, rec: Rec, created_at: datetime) -> None:
        fn = self.fns.get((rec.app, rec.fn))
        kept = Rec(rec.id, rec.app, rec.fn, created_at, CallStatus.QUEUED, When.at(created_at),
                   image=None if fn is None else fn.image, request=rec.request)  # fmt: skip
        self.model[rec.id] = kept

    @rule(cid=calls | ids)
    def retry_call(self, cid: str) -> None:
        rec = self.model.get(cid)
        if rec is None:
            with pytest.raises(CallNotFound):
                self.run(self.store.retry_call(cid))
        elif rec.status in LIVE:
            with pytest.raises(CallNotFinal):
                self.run(self.store.retry_call(cid))
        elif rec.request is None:
            with pytest.raises(RequestNotStored):
                self.run(self.store.retry_call(cid))
        else:
            again, now = self.timed(self.store.retry_call(cid))
            body, hdrs, priority = rec.request
            assert (again.id, again.app, again.fn, again.body) == (cid, rec.app, rec.fn, body)
            assert (dict(again.headers), again.priority, again.delay_s) == (hdrs, priority, 0)
            assert now.holds(again.created_at)
            self._requeued(rec, again.created_at)
            self.known[cid] = again  # the call as it is pushed again

    @rule(cid=calls | ids)
    def reopen(self, cid: str) -> None:
        changed, now = self.timed(self.store.reopen_call(cid))
        rec = self.model.get(cid)
        assert changed is (rec is not None and rec.status in FINAL_STATUSES)
        if rec is not None and changed:
            got = self.run(self.store.get_call(cid))
            assert got is not None and now.holds(got.created_at)
            self._requeued(rec, got.created_at)

    @rule(older=st.sampled_from([timedelta(0), timedelta(minutes=30), timedelta(hours=2),
                                 timedelta(days=365)]))  # fmt: skip
    def purge(self, older: timedelta) -> None:
        lo = self.store.clock.now()
        n = self.run(self.store.purge_calls(older))
        hi = self.store.clock.now()
        gone = []
        for rec in self.model.values():
            if rec.status in LIVE or rec.completed_at is None:
                continue
            assert rec.completed_at.hi < lo - older or rec.completed_at.lo >= hi - older, (
                "a purge too close to a completion to tell"
            )
            if rec.completed_at.hi < lo - older:
                gone.append(rec.id)
        assert n == len(gone)
        for cid in gone:
            del self.model[cid]
            assert self.run(self.store.get_log(cid)) is None

    # -------------------------------------------------------------- reads
    def _matching(self, f: CallFilter) -> list[Rec]:
        recs = [
            r for r in self.model.values()
            if (f.app is None or r.app == f.app) and (f.fn is None or r.fn == f.fn)
            and (f.status is None or r.status is f.status)
            and (f.since is None or r.created_at >= f.since)
        ]  # fmt: skip
        return sorted(recs, key=lambda r: r.key, reverse=True)

    @rule(app=st.none() | st.sampled_from(APPS), fn=st.none() | st.sampled_from(FNS),
          status=st.none() | st.sampled_from(list(CallStatus)),
          since=st.none() | st.integers(-1, 5), limit=st.sampled_from([0, 1, 2, 3, 7, 30, 5000]),
          adds=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6)), max_size=4),
          fresh=st.sampled_from(APPS))  # fmt: skip
    def list_pages(self, app: str | None, fn: str | None, status: CallStatus | None,
                   since: int | None, limit: int, adds: list[tuple[int, int]],
                   fresh: str) -> None:  # fmt: skip
        """Walk every page; between pages calls may be queued (``adds``: how many,
        minutes back), some older than the cursor. Each page is then exactly the model's
        next records after the cursor, so none is seen twice and none skipped."""
        when = None if since is None else self.t0 - timedelta(minutes=since)
        base = CallFilter(app=app, fn=fn, status=status, since=when, limit=limit)
        first = {r.id for r in self._matching(base)}
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = self.run(self.store.list_calls(dataclasses.replace(base, cursor=cursor)))
            pages += 1
            after = self._matching(base)
            if cursor is not None:
                at = decode_cursor(cursor)
                after = [r for r in after if r.key < at]
            size = max(1, min(LIST_LIMIT_MAX, limit))
            assert [r.id for r in page.items] == [r.id for r in after[:size]]
            for want, got in zip(after, page.items, strict=False):
                check_record(want, got, with_body=False)
            assert (page.next_cursor is not None) is (len(after) > size)
            seen.extend(r.id for r in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
            assert decode_cursor(cursor) == (page.items[-1].created_at, page.items[-1].id)
            if adds and pages <= len(adds):
                n, minutes = adds[pages - 1]
                for _ in range(n):
                    self.serial += 1
                    call = Call(id=f"n{self.serial}", app=fresh, fn=FNS[0],
                                created_at=self.t0 - timedelta(minutes=minutes))  # fmt: skip
                    self._make(call)
                    self.queued(call.id, None)  # a rule of its own, run as a step here
        assert len(seen) == len(set(seen))
        assert first <= set(seen)  # every record there at the start was seen

    @rule(app=st.none() | st.sampled_from(APPS), fn=st.none() | st.sampled_from(FNS))
    def counts(self, app: str | None, fn: str | None) -> None:
        got = self.run(self.store.count_by_status(app, fn))
        want = dict.fromkeys(CallStatus, 0)
        for r in self._matching(CallFilter(app=app, fn=fn)):
            want[r.status] += 1
        assert got == want

    @rule(picked=st.lists(calls | ids, max_size=5))
    def cancel_lookup(self, picked: list[str]) -> None:
        got = self.run(self.store.cancel_requested(picked))
        want = {
            cid for cid in picked
            if cid in self.model and (self.model[cid].cancel_requested
                                      or self.model[cid].status is CallStatus.CANCELLED)
        }  # fmt: skip
        assert got == want

    @rule(picked=st.lists(calls | ids, max_size=5))
    def wait_now(self, picked: list[str]) -> None:
        waited = self.run(wait.wait_for_calls(self.store, picked, 0))
        assert waited.ids == list(dict.fromkeys(picked))
        pending = [c for c in waited.ids if c not in self.model or self.model[c].status in LIVE]
        assert waited.pending == pending
        assert set(waited.records) == {c for c in waited.ids if c in self.model}
        for cid, got in waited.records.items():
            check_record(self.model[cid], got, with_body=True)

    @rule(cid=calls, data=st.data())
    def wait_for_end(self, cid: str, data: st.DataObject) -> None:
        """A wait started before the call ends returns once it has, with its record."""
        rec = self.model.get(cid)
        if rec is not None and rec.status not in LIVE:
            return
        call = self.known[cid]
        outcome = data.draw(outcomes(FINALS, self.t0))
        ended: list[str] = []

        async def both() -> tuple[wait.Waited, bool, When]:
            waiting = asyncio.ensure_future(
                wait.wait_for_calls(self.store, [cid], 10, lambda r: ended.append(r.id))
            )
            await asyncio.sleep(0.002)
            lo = self.store.clock.now()
            changed = await self.store.record_outcome(call, outcome, 1, "w1")
            now = When(lo, self.store.clock.now())
            return await waiting, changed, now

        waited, changed, now = self.run(both())
        self._finished(call, outcome, 1, "w1", False, changed, now)
        assert waited.pending == [] and ended == [cid]
        check_record(self.model[cid], waited.records[cid], with_body=True)

    # ---------------------------------------------------------- registry
    @rule(fn=functions())
    def create_fn(self, fn: Function) -> None:
        key = (fn.app, fn.name)
        if not fn_is_good(fn):
            with pytest.raises(InvalidFunction):
                self.run(self.store.create_fn(fn))
        elif key in self.fns:
            with pytest.raises(FunctionExists):
                self.run(self.store.create_fn(fn))
        else:
            created, now = self.timed(self.store.create_fn(fn))
            same_fn(created, fn)
            assert created.created_at == created.updated_at and now.holds(created.created_at)
            self.fns[key] = fn
            self.fn_times[key] = (When.at(created.created_at), When.at(created.updated_at))

    @rule(app=st.sampled_from(APPS), name=st.sampled_from(FNS), change=changes())
    def update_fn(self, app: str, name: str, change: dict[str, Any]) -> None:
        key = (app, name)
        current = self.fns.get(key)
        known = set(FN_VALUES)
        if current is None:
            with pytest.raises(FunctionNotFound):
                self.run(self.store.update_fn(app, name, **change))
            return
        if set(change) - known:
            with pytest.raises(InvalidFunction, match="cannot change"):
                self.run(self.store.update_fn(app, name, **change))
            return
        values: dict[str, Any] = {k: frozen_map(v) if k == "config" else v
                                  for k, v in change.items()}  # fmt: skip
        wanted = dataclasses.replace(current, **values)
        if not fn_is_good(wanted):
            with pytest.raises(InvalidFunction):
                self.run(self.store.update_fn(app, name, **change))
            return
        updated, now = self.timed(self.store.update_fn(app, name, **change))
        same_fn(updated, wanted)
        created, _ = self.fn_times[key]
        assert updated.created_at == created.lo and now.holds(updated.updated_at)
        self.fns[key] = wanted
        assert updated.updated_at is not None
        self.fn_times[key] = (created, When.at(updated.updated_at))

    @rule(app=st.sampled_from(APPS), name=st.sampled_from(FNS))
    def delete_fn(self, app: str, name: str) -> None:
        gone = self.run(self.store.delete_fn(app, name))
        assert gone is ((app, name) in self.fns)
        self.fns.pop((app, name), None)
        self.fn_times.pop((app, name), None)

    # --------------------------------------------------------- invariants
    @invariant()
    def store_equals_model(self) -> None:
        everything = self.run(self.store.list_calls(CallFilter(limit=LIST_LIMIT_MAX)))
        want = self._matching(CallFilter())
        assert [r.id for r in everything.items] == [r.id for r in want]
        by_id = self.run(self.store.get_calls([*self.model, "absent"]))
        assert set(by_id) == set(self.model)
        for cid, rec in self.model.items():
            check_record(rec, by_id[cid], with_body=True)
            one = self.run(self.store.get_call(cid))
            assert one is not None
            check_record(rec, one, with_body=True)
            assert self.run(self.store.get_log(cid)) == rec.log, f"{cid}: log"

    @invariant()
    def registry_equals_model(self) -> None:
        listed = self.run(self.store.list_fns())
        assert [(f.app, f.name) for f in listed] == sorted(self.fns)
        for fn in listed:
            key = (fn.app, fn.name)
            same_fn(fn, self.fns[key])
            created, updated = self.fn_times[key]
            assert (fn.created_at, fn.updated_at) == (created.lo, updated.lo)
        for app in APPS:
            assert [f.name for f in self.run(self.store.list_fns(app))] == sorted(
                n for a, n in self.fns if a == app
            )
            for name in FNS:
                got = self.run(self.store.get_fn(app, name))
                assert (got is None) is ((app, name) not in self.fns)
                assert got is None or got in listed


# ---------------------------------------------------------------------- the test

TABLES = ("logs", "calls", "fns", "workers")
# Per backend and log place: a few seconds each (the profile is derandomized).
EXAMPLES = 30
STEPS = 40


def emptier(db_url: str, backend: str, log_dir: Path | None) -> Any:
    """A coroutine function that empties the store's tables and log directory (a fresh
    store per example)."""

    async def on_sqlite() -> None:
        conn = sqlite3.connect(db_url.removeprefix("sqlite://"), timeout=5)
        try:
            with conn:
                for table in TABLES:
                    conn.execute(f"DELETE FROM {table}")
        finally:
            conn.close()

    async def on_postgres() -> None:
        conn = await asyncpg.connect(db_url, timeout=10)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
        finally:
            await conn.close()

    async def empty() -> None:
        await (on_sqlite() if backend == "sqlite" else on_postgres())
        if log_dir is not None:
            shutil.rmtree(log_dir)
            log_dir.mkdir()

    return empty


@pytest.mark.parametrize("logs", ["table", "files"])
def test_the_store_behaves_as_its_model(
    backend: str, logs: str, db_url: str, settings_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wait, "FIRST_POLL_S", 0.005)  # a wait sees a call end sooner
    log_dir = None
    if logs == "files":
        log_dir = settings_env / "logs"
        log_dir.mkdir()
    with asyncio.Runner() as runner:
        config = load_settings(data_dir=settings_env / "data", db_url=db_url,
                               log_url="" if log_dir is None else f"file://{log_dir}",
                               max_response_size=MAX_RESPONSE, max_log_size_bytes=MAX_LOG,
                               max_request_size=MAX_REQUEST)  # fmt: skip
        store = runner.run(open_datastore(config))
        assert isinstance(store, SqlDatastore)
        try:
            machine = type(
                "Machine",
                (StoreModel,),
                {
                    "store": store,
                    "runner": runner,
                    "reset": staticmethod(emptier(db_url, backend, log_dir)),
                    "files": log_dir is not None,
                },
            )
            run_state_machine_as_test(
                machine, settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS)
            )
        finally:
            runner.run(store.close())
