"""The soak's memory arithmetic (benchmarks/soak.py): slopes by least squares, peaks, warm-up."""
from __future__ import annotations

import pytest

from benchmarks import soak


def test_slope_is_least_squares_in_mib_per_hour():
    line = [(t, 100 + 5 * t / 3600) for t in range(0, 3601, 60)]  # +5 MiB/h exactly
    assert soak.slope_mib_per_hour(line) == pytest.approx(5.0)
    noisy = [(t, m + (0.5 if i % 2 else -0.5)) for i, (t, m) in enumerate(line)]
    assert soak.slope_mib_per_hour(noisy) == pytest.approx(5.0, abs=0.1)
    assert soak.slope_mib_per_hour(line[:1]) == 0.0


def test_memory_report_judges_growth_once_warm_and_the_servers_peak_by_sample():
    # java grows fast while warming up (first 300 s), then stays flat; a worker appears in two samples only.
    samples = [(t, {"java": 200 + min(t, 300) / 3, "w:1": 500.0}) for t in range(0, 1201, 60)]
    samples[-1][1].pop("w:1")
    report = soak.memory_report(samples, warm_after=300)
    java = report["processes"]["java"]
    assert java["slope_mib_per_h"] == pytest.approx(0.0) and java["peak_mib"] == 300.0
    assert java["first_mib"] == 200.0 and java["warm_samples"] == 16
    assert report["processes"]["w:1"]["last_mib"] == 500.0
    assert report["server_peak_mib"] == 800.0


def test_high_water_marks_are_the_kernels_and_bound_the_samples():
    import os

    rss = soak.rss_of({"me": os.getpid()})["me"]  # first: the high-water mark is never below an earlier RSS
    mine = soak.high_water_mib({"me": os.getpid(), "gone": 2**22 + 12345})
    assert set(mine) == {"me"} and mine["me"] >= rss
    report = soak.memory_report([(0.0, {"a": 10.0}), (60.0, {"a": 12.0})], warm_after=0, high_water={"a": 20.0})
    assert report["processes"]["a"]["high_water_mib"] == 20.0 and report["high_water_sum_mib"] == 20.0


def test_the_floods_bodies_are_the_size_asked_and_decode():
    import io

    from PIL import Image

    from benchmarks.flood import noise_png

    body = noise_png(1.0)
    assert abs(len(body) - 2**20) < 0.02 * 2**20  # noise does not compress: 3 bytes a pixel, plus PNG's framing
    assert Image.open(io.BytesIO(body)).convert("RGB").size[0] == 1024
