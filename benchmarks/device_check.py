"""Check a device against the CPU with the real handlers: same answers, and how fast.

    python -m benchmarks.device_check --device cuda [--store model_store] [--count 1000] [--out check.json]

For every shipped version whose archive is in `--store` (`make archive` builds them), the archive is unpacked and
its handler run in this process (`serving/inprocess.py`: the archive's own code over a real TorchServe Context)
twice: once on the CPU, once on `--device` (for CUDA, as a worker TorchServe gave `gpu_id` 0). Both answer the
same `--count` validation images, sent as PNGs, the request form clients use; the check reports how many top-1
labels agree, each side's accuracy against the true labels, and the handler's whole work per second (decode,
forward, calibrated top-k, JSON) at server-side batches of 8 and 64. Each side serves in the numeric mode its
worker would choose (`models/numerics.py`: bf16 where the device computes it natively and agrees with fp32 on
the shipped reference images), so the device side is also run in fp32 to separate kernels from numerics.

The validation images come from `--validation DATASET=NPZ` (written by `python -m training.reference --count N`)
or, when not given, from ../shared/data. A GPU is the point of the check, but `--device cpu` runs the same code
on a machine without one (the tests do).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import images_per_second
from models import reference
from models.specs import SPECS
from serving.catalog import ROOT, SHIPPED, ModelVersion
from serving.inprocess import InProcessHandler, unpack

BATCHES = (8, 64)
EXPLAINED = 4  # images explained on each side (Integrated Gradients; the handler's per-request limit)


def pngs(images: np.ndarray) -> list[bytes]:
    """uint8 N×C×H×W → one PNG per image, as a client would send them."""
    from PIL import Image

    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def validation(dataset: str, given: dict[str, Path], count: int) -> tuple[np.ndarray, np.ndarray]:
    if dataset in given:
        with np.load(given[dataset]) as npz:
            images, labels = npz["images"], npz["labels"]
        if len(labels) < count:
            raise SystemExit(f"{given[dataset]} holds {len(labels)} images; --count asks for {count}")
        return images[:count], labels[:count]
    shared = ROOT.parent / "shared" / "data" / f"{dataset}_train.npz"
    if not shared.exists():
        raise SystemExit(f"no validation images for {dataset}: pass --validation {dataset}=NPZ "
                         f"(python -m training.reference --count {count} --out NPZ) or provide {shared}")
    return reference.reference_set(dataset, "npz", shared, count=count)


def top1(handler: InProcessHandler, bodies: list[bytes], batch: int) -> list[str]:
    """The top label of every image, answered in server-side batches of `batch` requests."""
    labels = []
    for start in range(0, len(bodies), batch):
        for status, answer in handler.run([{"body": body} for body in bodies[start:start + batch]]):
            if status != 200:
                raise RuntimeError(f"the handler answered {status}: {answer}")
            labels.append(next(iter(answer)))  # native answers list the top-k best first
    return labels


def explain(handler: InProcessHandler, bodies: list[bytes]) -> list[dict]:
    """Explanations of the first EXPLAINED images, one request each and one per server-side batch (a worker
    explains one request per batch: handlers/explaining.py)."""
    answers = [handler.one({"body": body}, route="explanations") for body in bodies[:EXPLAINED]]
    for status, answer in answers:
        if status != 200:
            raise RuntimeError(f"the handler answered {status} to an explanation: {answer}")
    return [answer for _, answer in answers]


def side(model_dir: Path, gpu: int | None, numerics: str, bodies: list[bytes], truth: list[str],
         seconds: float) -> dict:
    """One device's answers and speed in one numeric mode; a handler per batch size, since "auto" is timed at the
    worker's batch size and may choose differently."""
    result: dict = {"rate": {}, "numerics": {}}
    for batch in BATCHES:
        handler = InProcessHandler(model_dir, {"batchSize": batch, "handler": {"numerics": numerics}}, gpu=gpu)
        if batch == BATCHES[-1]:
            result["labels"] = top1(handler, bodies, batch)
            result["accuracy"] = float(np.mean([a == b for a, b in zip(result["labels"], truth, strict=True)]))
            result["explanations"] = explain(handler, bodies)
        result["rate"][batch] = round(images_per_second(handler, bodies, seconds, batch), 1)
        result["numerics"][batch] = dataclasses.asdict(handler.handler.numerics)
        result["device"] = str(handler.handler.device)
    return result


def compare(cpu: dict, dev: dict) -> dict:
    """How far the device's answers are from the CPU's: top-1 labels, and the explanations' maps (float32 on
    both sides whatever the serving numerics)."""
    maps = [(np.array(c["attributions"]), np.array(d["attributions"]))
            for c, d in zip(cpu["explanations"], dev["explanations"], strict=True)]
    return {"top1_equal": sum(a == b for a, b in zip(cpu["labels"], dev["labels"], strict=True)),
            "explained_same_label": sum(c["label"] == d["label"]
                                        for c, d in zip(cpu["explanations"], dev["explanations"], strict=True)),
            "explanation_max_relative_l2": round(max(float(np.linalg.norm(c - d) / np.linalg.norm(c))
                                                     for c, d in maps), 6)}


def check(version: ModelVersion, store: Path, device: str, bodies: list[bytes], truth: list[str],
          seconds: float) -> dict:
    """Both sides of one version in the mode each would choose ("auto") and in fp32."""
    gpu = 0 if device == "cuda" else None
    sides = {}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        for name, on in (("cpu", None), ("device", gpu)):
            model_dir = unpack(store / version.archive_name, Path(tmp) / name)
            for numerics in ("auto", "fp32"):
                sides[f"{name}_{numerics}"] = side(model_dir, on, numerics, bodies, truth, seconds)
    return {"version": f"{version.model} {version.version}", "images": len(bodies),
            "auto": compare(sides["cpu_auto"], sides["device_auto"]),
            "fp32": compare(sides["cpu_fp32"], sides["device_fp32"]),
            **{name: {k: v for k, v in result.items() if k not in ("labels", "explanations")}
               for name, result in sides.items()}}


def host() -> dict:
    from models import numerics

    info = {"cpu": numerics.cpu_model(), "isa": numerics.isa(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--count", type=int, default=1000, help="validation images per version")
    p.add_argument("--validation", action="append", default=[], metavar="DATASET=NPZ")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per device and batch size")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    given = dict(item.split("=", 1) for item in args.validation)
    given = {dataset: Path(path) for dataset, path in given.items()}
    results = []
    for version in SHIPPED:
        if not (args.store / version.archive_name).exists():
            print(f"skipping {version.model} {version.version}: no {version.archive_name} in {args.store}",
                  file=sys.stderr)
            continue
        images, labels = validation(version.model, given, args.count)
        truth = [SPECS[version.model].classes[label] for label in labels]
        results.append(check(version, args.store, args.device, pngs(images), truth, args.seconds))
    report = {"host": host(), "device": args.device, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["host"]))
    dev = args.device
    print(f"| version | numerics CPU / {dev} | top-1 equal (auto / fp32) | accuracy CPU / {dev} | CPU img/s b8 / b64 "
          f"| {dev} img/s b8 / b64 | fp32 img/s CPU b64 / {dev} b64 | explanations: same label, max rel. L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        c, d = r["cpu_auto"], r["device_auto"]
        n = r["images"]
        print(f"| {r['version']} | {c['numerics'][64]['mode']} / {d['numerics'][64]['mode']} | "
              f"{r['auto']['top1_equal']}/{n} / {r['fp32']['top1_equal']}/{n} | "
              f"{c['accuracy']:.1%} / {d['accuracy']:.1%} | {c['rate'][8]:.0f} / {c['rate'][64]:.0f} | "
              f"{d['rate'][8]:.0f} / {d['rate'][64]:.0f} | {r['cpu_fp32']['rate'][64]:.0f} / "
              f"{r['device_fp32']['rate'][64]:.0f} | {r['fp32']['explained_same_label']}/{EXPLAINED}, "
              f"{r['fp32']['explanation_max_relative_l2']:.1e} |")
    return results


if __name__ == "__main__":
    main()
