"""The worker sets the garbage collector up for serving once it has started."""

from __future__ import annotations

import gc

from worker.runtime import GC_YOUNG_THRESHOLD, tune_garbage_collector


def test_startup_objects_frozen_and_young_collections_rarer() -> None:
    before = gc.get_threshold()
    assert before[0] < GC_YOUNG_THRESHOLD
    survivor = [object() for _ in range(10)]  # made before: counts among the frozen
    try:
        tune_garbage_collector()
        assert gc.get_freeze_count() >= len(survivor)
        young, older, oldest = gc.get_threshold()
        assert young == GC_YOUNG_THRESHOLD
        assert (older, oldest) == before[1:]  # the older generations as they were
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
