"""Shared domain values."""

from __future__ import annotations

import threading
import time

from config.domain import FINAL_STATUSES, CallStatus, new_call_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def test_call_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_call_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


def test_call_ids_are_base32_of_the_time_and_the_random_part() -> None:
    """Read back digit by digit: the top 48 bits are the creation time in ms."""
    before = time.time_ns() // 1_000_000
    call_id = new_call_id()
    after = time.time_ns() // 1_000_000
    value = 0
    for char in call_id:
        value = value * 32 + CROCKFORD.index(char)
    assert value < 1 << 128
    assert before <= value >> 80 <= after
    assert call_id[0] in "0123"  # 26 digits carry 130 bits; the top two are zero


def _decode(call_id: str) -> int:
    value = 0
    for char in call_id:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_ids_of_one_millisecond_count_up_by_one() -> None:
    """Within a millisecond the random part of the last id is incremented, digit
    carries included."""
    for _ in range(1000):
        a, b = new_call_id(), new_call_id()
        if a[:10] == b[:10]:  # the same millisecond
            assert _decode(b) == _decode(a) + 1
            return
    raise AssertionError("no two ids in the same millisecond")


def test_call_ids_unique_across_threads() -> None:
    out: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        batch = [new_call_id() for _ in range(2000)]
        with lock:
            out.extend(batch)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 8000


def test_status_sets() -> None:
    assert CallStatus.SUCCESS.is_final
    assert not CallStatus.RUNNING.is_final
    assert {"success", "error", "timeout", "cancelled"} == FINAL_STATUSES
