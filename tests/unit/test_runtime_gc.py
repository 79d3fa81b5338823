"""The worker sets the garbage collector up for serving once it has started."""

from __future__ import annotations

import gc

from worker.runtime import GC_YOUNG_THRESHOLD, tune_garbage_collector


def test_startup_objects_frozen_and_young_collections_rarer() -> None:
    saved = gc.get_threshold()
    gc.set_threshold(700, 11, 12)  # older generations' values of its own, to see them kept
    frozen_before = gc.get_freeze_count()
    try:
        tune_garbage_collector()
        assert gc.get_freeze_count() > frozen_before  # what exists is out of sight
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
