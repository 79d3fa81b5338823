"""The worker's cache of function definitions: it holds the functions called lately,
not every name ever called."""

from __future__ import annotations

import random

import pytest

from config.domain import Function
from config.settings import load_settings
from worker import calls
from worker.calls import CallHandler
from worker.metrics import Metrics


class Registry:
    """The datastore's registry: function ``f0`` of app ``a``, and no other."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_fn(self, app: str, name: str) -> Function | None:
        self.reads += 1
        return Function(app, name, "img") if (app, name) == ("a", "f0") else None


async def test_definitions_past_their_time_leave_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calls, "FN_CACHE_KEEP", 8)
    registry = Registry()
    handler = CallHandler(
        load_settings(), registry, None,  # type: ignore[arg-type]
        metrics=Metrics(), worker_id="w", rng=random.Random(),
    )  # fmt: skip
    assert await handler._function("a", "f0") is not None
    assert await handler._function("a", "f0") is not None
    assert registry.reads == 1  # within FN_CACHE_TTL_S: from the cache
    monkeypatch.setattr(calls, "FN_CACHE_TTL_S", 0.0)  # from here on, each is stale at once
    for n in range(100):  # names of no function, as a producer may send
        assert await handler._function("a", f"missing-{n}") is None
    assert len(handler._fn_cache) <= 8
    assert await handler._function("a", "f0") is not None
    assert registry.reads == 102
