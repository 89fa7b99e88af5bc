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
