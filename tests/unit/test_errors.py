"""config.errors.reason_of: a failure in words, never an empty reason."""

from __future__ import annotations

import asyncio

from config.errors import QueueError, reason_of


def test_an_error_with_a_message_is_its_message() -> None:
    assert reason_of(QueueError("redis queue: down")) == "redis queue: down"
    assert reason_of(TimeoutError("took too long"), 5.0) == "took too long"


def test_a_timeout_without_a_message_says_what_ran_out() -> None:
    assert reason_of(TimeoutError(), 5.0) == "no answer within 5 s"
    assert reason_of(TimeoutError(), 20 / 3) == "no answer within 6.67 s"
    assert reason_of(TimeoutError()) == "timed out"


async def test_an_asyncio_timeout_has_a_reason_too() -> None:
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
    except TimeoutError as exc:
        assert reason_of(exc, 0.01) == "no answer within 0.01 s"


def test_another_error_without_a_message_is_named() -> None:
    assert reason_of(ConnectionResetError()) == "ConnectionResetError"
