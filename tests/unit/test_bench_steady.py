"""The benchmarks' probe of how steadily the host ran (bench._steady)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from bench._steady import BEST_PERCENTILE, SLOW_FACTOR, WINDOW_S, SteadyProbe


def _loaded(tmp_path: Path, samples: list[tuple[float, float]]) -> SteadyProbe:
    """A probe that measured ``samples`` (start, seconds), as ``stop`` loads them."""
    probe = SteadyProbe(tmp_path / "steady.bin")
    probe._starts = [start for start, _ in samples]
    probe._seconds = [seconds for _, seconds in samples]
    ordered = sorted(probe._seconds)
    probe.best_s = ordered[len(ordered) * BEST_PERCENTILE // 100]
    return probe


def test_a_window_is_slow_when_its_median_chunk_took_the_factor_times_the_best(
    tmp_path: Path,
) -> None:
    step = WINDOW_S / 10
    samples = [((i + 0.5) * step, 10e-6) for i in range(40)]  # four windows at full speed
    # the third window: most of its chunks slow, by just the factor
    for i in range(20, 27):
        samples[i] = (samples[i][0], 10e-6 * SLOW_FACTOR)
    # the fourth: three slow chunks of ten, its median is still fast
    for i in (30, 31, 32):
        samples[i] = (samples[i][0], 10e-6 * 50)
    probe = _loaded(tmp_path, samples)
    assert probe.windows(0.0, 4 * WINDOW_S) == pytest.approx([1.0, 1.0, SLOW_FACTOR, 1.0])
    assert probe.slow_share(0.0, 4 * WINDOW_S) == 0.25
    assert probe.slow_share(0.0, 2 * WINDOW_S) == 0.0  # only the span asked for


def test_nothing_measured_is_no_share(tmp_path: Path) -> None:
    probe = SteadyProbe(tmp_path / "steady.bin")
    assert probe.windows(0.0, 1.0) == []
    assert math.isnan(probe.slow_share(0.0, 1.0))
    probe.stop()  # never started: nothing to do


def test_the_probe_process_times_its_chunks_until_stopped(tmp_path: Path) -> None:
    probe = SteadyProbe(tmp_path / "steady.bin").start()
    t0 = time.monotonic()
    time.sleep(0.3)
    t1 = time.monotonic()
    probe.stop()
    assert 0 < probe.best_s < 0.01
    windows = probe.windows(t0, t1)
    assert len(windows) >= int(0.3 / WINDOW_S) - 1  # a chunk every few ms, in each window
    assert all(factor > 0 for factor in windows)
    assert 0.0 <= probe.slow_share(t0, t1) <= 1.0
