"""Accuracy against throughput per test-time augmentation level, for choosing `handler.tta`.

    python -m benchmarks.tta [--model cifar10] [--version 2.0] [--seconds 5]

For each level the data set admits: the validation accuracy as served (calibrated probabilities averaged over the
views) and the temperature, both from the model card's calibration section (`make evaluate` writes it), and the
whole handler's images/s in this process at batch 8 on one thread, as a worker runs it (decode, numerics chosen
as the worker would, forward passes, top-k, JSON), on the benchmark's 32×32 PNGs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.run import bench_images, images_per_second
from serving import archive
from serving.catalog import SHIPPED
from serving.inprocess import InProcessHandler, unpack


def table(model: str, version: str, seconds: float) -> list[dict]:
    shipped = next(v for v in SHIPPED if (v.model, v.version) == (model, version))
    levels = json.loads(shipped.weights.with_suffix(".json").read_text())["calibration"]["levels"]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = unpack(archive.build(shipped, tmp / "store"), tmp / "unpacked")
        pngs = [path.read_bytes() for path in bench_images(tmp / "png")]
        rows = []
        for level, fitted in levels.items():
            handler = InProcessHandler(model_dir, {"handler": {"tta": int(level)}})
            rows.append({"tta": int(level), "accuracy": fitted["after"]["accuracy"],
                         "temperature": fitted["temperature"], "numerics": handler.handler.numerics.mode,
                         "images_per_s": round(images_per_second(handler, pngs, seconds, batch=8), 1)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10")
    p.add_argument("--version", default="2.0")
    p.add_argument("--seconds", type=float, default=5.0, help="timing per level")
    args = p.parse_args(argv)
    rows = table(args.model, args.version, args.seconds)
    print("| handler.tta | validation accuracy, as served | T | numerics | img/s (batch 8, one thread) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tta']} | {row['accuracy']:.2%} | {row['temperature']:.3f} | {row['numerics']} | "
              f"{row['images_per_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
