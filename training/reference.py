"""Writing the reference images shipped in every archive (a fixed sample of the held-out validation split), and the
images int8 quantization is calibrated on (a fixed slice of the training split); models/reference.py says where.

    python -m training.reference --dataset cifar10 --data-source npz --data-path ../shared/data/cifar10_train.npz

A worker checks a faster numeric mode against fp32 on these images before it serves with it
(`models/numerics.py`). They are the first REFERENCE_SIZE images of the validation split (already a seeded
permutation, so a class-balanced sample in expectation), never seen in training, and live in
`models/weights/<dataset>_reference.npz` so that `make archive` on a clone without the data still ships them.

The calibration images are the first CALIBRATION_SIZE training images of the same permutation (never the
validation split that judges the quantized model, never the held-out test set), with their indices into the
training file; committed as `models/weights/<dataset>_calibration.npz` for the same reason (serving/quantize.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models import data
from models.reference import (
    REFERENCE_SIZE,
    calibration_of,
    calibration_path_for,
    calibration_set,
    path_for,
    reference_of,
    reference_set,
)
from models.specs import SPECS


def write_missing(dataset: str, images: torch.Tensor, labels: torch.Tensor, val_size: int) -> list[Path]:
    """A new data set's first training writes its reference and calibration images (an archive needs both), from
    the split it trains on; files already there are the committed ones and stay. Returns what was written."""
    written = []
    if not path_for(dataset).exists():
        reference_images, reference_labels = reference_of(images, labels, val_size)
        np.savez_compressed(path_for(dataset), images=reference_images, labels=reference_labels)
        written.append(path_for(dataset))
    if not calibration_path_for(dataset).exists():
        calibration_images, indices = calibration_of(images, labels, val_size)
        np.savez_compressed(calibration_path_for(dataset), images=calibration_images, train_indices=indices)
        written.append(calibration_path_for(dataset))
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(SPECS), required=True)
    p.add_argument("--data-source", choices=data.SOURCES, default="npz")
    p.add_argument("--data-path", type=Path, required=True)
    p.add_argument("--out", type=Path, help="defaults to models/weights/<dataset>_reference.npz")
    p.add_argument("--count", type=int, default=REFERENCE_SIZE,
                   help="how many validation images (a larger slice for `python -m benchmarks.device_check`)")
    args = p.parse_args(argv)
    images, labels = reference_set(args.dataset, args.data_source, args.data_path, count=args.count)
    out = args.out or path_for(args.dataset)
    np.savez_compressed(out, images=images, labels=labels)
    print(f"{out}: {len(images)} validation images, {out.stat().st_size / 1024:.0f} KiB")
    if args.out is None:
        images, indices = calibration_set(args.dataset, args.data_source, args.data_path)
        out = calibration_path_for(args.dataset)
        np.savez_compressed(out, images=images, train_indices=indices)
        print(f"{out}: {len(images)} training images (int8 calibration), {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
