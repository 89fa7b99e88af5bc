"""Build `.mar` archives with torch-model-archiver.

    python -m serving.archive                                   # every shipped version into model_store/
    python -m serving.archive --model cifar10 --version 2.0 --arch lenet --weights path/to/weights.pt

An archive holds the model file, the weights, the handler, the model-config YAML and, as extra files, the
`handlers/` and `models/` modules the handler imports (kept as packages, so the same import lines work in the
repository and in the worker), `index_to_name.json`, the data set's reference images with fp32's top-1 for them
(`reference.npz`, see training/reference.py and models/numerics.py) and the weights' model card
(`model_card.json`, whose calibration section gives the temperature the handler divides logits by), and the
network as ONNX Runtime runs it: `model.onnx`, `model.int8.onnx` and what they measured, `numerics.json`
(serving/quantize.py). Each archive gets a `.sha256` file beside it, which `make serve` checks before it starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from models import zoo
from models.checksum import sha256_of
from models.numerics import Runner, cpu_model, isa, load_reference, top1
from models.specs import SPECS
from serving import quantize
from serving.catalog import HANDLERS, ROOT, SHIPPED, ModelVersion
from training import reference

STAGED_MODULES = ["handlers/__init__.py", "handlers/image_classifier.py", "handlers/explaining.py",
                  "handlers/imaging.py", "handlers/payload.py", "handlers/oip.py", "models/__init__.py",
                  "models/specs.py", "models/inference.py", "models/numerics.py", "models/onnx_runtime.py"]
REFERENCE_FILE = "reference.npz"  # the reference images a worker checks a faster numeric mode against
CARD_FILE = "model_card.json"  # the weights' model card: accuracy, recipe, and the calibration temperatures


def fp32_record_path(weights: Path) -> Path:
    """Where fp32's top-1 for the data set's reference images with these weights is committed, beside them."""
    return weights.with_name(weights.stem + ".fp32-top1.json")


def computed_fp32_top1(model: str, weights: Path, arch: zoo.Architecture, images: torch.Tensor) -> np.ndarray:
    """fp32's top-1 on this host for the reference `images` (uint8) with these weights."""
    network = arch.build()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return top1(Runner(network.eval(), "fp32", torch.device("cpu")), SPECS[model].normalize(images)).numpy()


def recorded_fp32_top1(model: str, weights: Path) -> np.ndarray | None:
    """The committed fp32 top-1 for these weights, or None where there is none or it was made for other weights or
    other reference images (their hashes are in the record)."""
    path = fp32_record_path(weights)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if (record["weights_sha256"], record["reference_sha256"]) != (sha256_of(weights),
                                                                   sha256_of(reference.path_for(model))):
        return None
    return np.array(record["top1"], dtype=np.int64)


def record_fp32_top1(version: ModelVersion) -> Path:
    """Compute fp32's top-1 on this host and commit it beside the weights, with the host that computed it: an
    archive then ships the same answers whichever host builds it, and a test on every other host checks that its
    fp32 gives them too (tests/test_numerics.py)."""
    images, _, _ = load_reference(reference.path_for(version.model))
    top = computed_fp32_top1(version.model, version.weights, zoo.get(version.arch), images)
    path = fp32_record_path(version.weights)
    path.write_text(json.dumps({
        "weights_sha256": sha256_of(version.weights),
        "reference_sha256": sha256_of(reference.path_for(version.model)),
        "host": {"cpu": cpu_model(), "isa": isa(), "torch": torch.__version__},
        "top1": top.tolist()}) + "\n")
    return path


def write_reference(model: str, weights: Path, arch: zoo.Architecture, dest: Path) -> np.ndarray:
    """The data set's reference images plus fp32's top-1 for them with these weights: a worker checks a faster
    numeric mode against that answer without running fp32 over the images at every start (models/numerics.py).
    The committed record is used where it was made for these weights; other weights are computed on this host.
    Returns fp32's top-1."""
    images, labels, _ = load_reference(reference.path_for(model))
    fp32 = recorded_fp32_top1(model, weights)
    if fp32 is None:
        fp32 = computed_fp32_top1(model, weights, arch, images)
    np.savez_compressed(dest, images=images.numpy(), labels=labels.numpy(), fp32_top1=fp32)
    return fp32


def stage_extra_files(model: str, dest: Path, weights: Path, arch: zoo.Architecture, onnx: bool = True) -> dict:
    """Fill the folder passed as --extra-files (its contents land at the archive's root); returns what
    numerics.json says about the ONNX files (empty with `onnx=False`: an archive that serves torch only)."""
    for relative in STAGED_MODULES:
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    fp32 = write_reference(model, weights, arch, dest / REFERENCE_FILE)
    card = weights.with_suffix(".json")
    if card.exists():  # the handler takes its temperature from the card's calibration section
        shutil.copy2(card, dest / CARD_FILE)
    labels = {str(i): name for i, name in enumerate(SPECS[model].classes)}
    (dest / "index_to_name.json").write_text(json.dumps(labels, indent=1) + "\n")
    return quantize.build(model, weights, arch, dest, fp32) if onnx else {}


def build(version: ModelVersion, export_path: Path, config_file: Path | None = None, onnx: bool = True) -> Path:
    """Write `<export_path>/<archive_name>` and its `.sha256`; rebuilding replaces both. `onnx=False` leaves the
    ONNX Runtime files out (the benchmark's row for the torch-only configuration)."""
    arch = zoo.get(version.arch)
    if arch.dataset != version.model:
        raise ValueError(f"--arch {version.arch} is a {arch.dataset} network, not a {version.model} one")
    if not version.weights.is_file():
        raise FileNotFoundError(f"weights not found: {version.weights}")
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="archive-") as tmp:
        extra = Path(tmp) / "extra"
        stage_extra_files(version.model, extra, version.weights, arch, onnx)
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        # The archiver stages files in $TMPDIR/<model-name>/, a path shared by every build of that model on the
        # machine: two builds at once (a test beside `make archive`) would corrupt each other. A private TMPDIR
        # per build makes them independent.
        staging = Path(tmp) / "staging"
        staging.mkdir()
        subprocess.run(
            [str(Path(sys.executable).with_name("torch-model-archiver")),
             "--model-name", version.model, "--version", version.version,
             "--model-file", str(arch.source_file), "--serialized-file", str(version.weights),
             "--handler", str(HANDLERS[version.model]), "--extra-files", str(extra),
             "--config-file", str(config_file or version.config_file),
             "--export-path", str(out_dir), "--force"],
            check=True, env=dict(os.environ, TMPDIR=str(staging)))
        target = export_path / version.archive_name
        shutil.move(out_dir / f"{version.model}.mar", target)
    target.with_name(target.name + ".sha256").write_text(f"{sha256_of(target)}  {target.name}\n")
    return target


def shipped_numerics(target: Path, config_file: Path) -> str:
    """What the archive's numerics.json says, at the TTA level its YAML serves."""
    import yaml

    tta = int((yaml.safe_load(config_file.read_text()).get("handler") or {}).get("tta", 0))
    with zipfile.ZipFile(target) as mar:
        return quantize.summary(json.loads(mar.read("numerics.json")), tta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(HANDLERS), help="build one archive instead of every shipped one")
    p.add_argument("--version", default="1.0")
    p.add_argument("--arch", help="network name (models/zoo.py); defaults to the shipped version's")
    p.add_argument("--weights", type=Path, help="state_dict file; defaults to the shipped version's")
    p.add_argument("--config-file", type=Path,
                   help="model-config YAML; defaults to model-config/<model>-<version>.yaml if it exists, "
                        "else model-config/<model>.yaml")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    p.add_argument("--record-fp32", action="store_true",
                   help="write models/weights/<weights>.fp32-top1.json for every shipped version instead (make "
                        "reference): fp32's top-1 for the reference images, computed on this host")
    args = p.parse_args(argv)

    if args.record_fp32:
        for version in SHIPPED:
            print(f"{record_fp32_top1(version).relative_to(ROOT)}: fp32 top-1 of {version.model} {version.version}")
        return

    if args.model:
        shipped = {(v.model, v.version): v for v in SHIPPED}.get((args.model, args.version))
        default_arch = shipped.arch if shipped else next(v.arch for v in SHIPPED if v.model == args.model)
        weights = args.weights or (shipped.weights if shipped else None)
        if weights is None:
            p.error(f"{args.model} {args.version} is not shipped: pass --weights")
        versions = [ModelVersion(args.model, args.version, args.arch or default_arch, weights.resolve())]
    else:
        versions = SHIPPED
    for version in versions:
        start = time.perf_counter()
        target = build(version, args.export_path, args.config_file)
        print(f"{target.relative_to(Path.cwd()) if target.is_relative_to(Path.cwd()) else target}: "
              f"{version.model} {version.version} ({version.arch}), {target.stat().st_size / 1024:.0f} KiB, "
              f"{time.perf_counter() - start:.1f} s;\n  "
              f"{shipped_numerics(target, args.config_file or version.config_file)}")


if __name__ == "__main__":
    main()
