"""`make bench` in a seconds-long smoke mode, so the benchmark cannot rot (numbers are not asserted)."""
from __future__ import annotations

import json
import shutil

from benchmarks import run, tta
from models import numerics
from tests.conftest import require


def test_benchmark_smoke_mode_runs_every_part(tmp_path):
    require(shutil.which("wrk") is not None, "wrk is not installed (make bench-deps installs Debian's package)")
    report = run.main(["--smoke", "--out", str(tmp_path)])
    assert set(report["ceiling"]) == {"batch_1", "batch_8", "batch_32"}
    assert set(report["runs"]) == {"torchserve", "flask threaded"}
    for points in report["runs"].values():
        assert set(points) == {"1", "4"}
        assert all(p["requests"] > 0 and p["errors"] == 0 and p["p99_ms"] for p in points.values())
    assert report["failed"] == {}
    assert report["facts"]["cold_start_s"] > 0 and report["facts"]["worker_rss_mib"]
    # The host and the numerics each server chose are part of every result (issue: speed per host).
    assert report["machine"]["cpu"] == numerics.cpu_model() and report["machine"]["isa"] == numerics.isa()
    # "ort-fp32 (auto; fp32 152 img/s, ..., ort-fp32 290 img/s; validation accuracy ...)": the mode and what the
    # worker measured to choose it.
    chosen, _, measured = report["facts"]["numerics"]["cifar10 1.0"].partition(" ")
    assert chosen in numerics.REQUESTS[1:] and "fp32 " in measured and "img/s" in measured
    [md] = tmp_path.glob("bench-*.md")
    assert "| torchserve | 1 |" in md.read_text()
    assert f"ISA: {' '.join(numerics.isa())}" in md.read_text() and "Numerics the workers chose: cifar10 1.0 " in \
        md.read_text()
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["smoke"] is True
    assert next(tmp_path.glob("bench-*.png")).read_bytes()[:4] == b"\x89PNG"


def test_the_tta_table_measures_every_level_of_a_version(capsys):
    rows = tta.main(["--model", "cifar10", "--version", "1.0", "--seconds", "0.2"])
    assert [row["tta"] for row in rows] == [0, 1, 2]
    assert all(row["images_per_s"] > 0 and row["numerics"] in numerics.REQUESTS[1:] for row in rows)
    assert "| 2 | " in capsys.readouterr().out
