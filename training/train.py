"""Train one network on CIFAR-10 or MNIST and write its weights-only state_dict and model card.

    python -m training.train --arch lenet --data-source npz --data-path ../shared/data/cifar10_train.npz \
        --out models/weights/cifar10_lenet.pt

Every epoch is seeded on its own (shuffle, augmentation and dropout draw from `seed + epoch`), so `--resume`
from the checkpoint of epoch k continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models import data, zoo
from models.checksum import sha256_of
from models.specs import SPECS
from training import reference
from training.augment import augment
from training.evaluate import accuracy_report, calibration_report, predict


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters that make an architecture reach its target: these defaults, then what the network's file
    says differs (its class's `recipe` dict, beside the layers it tunes), then the command line's flags."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    translate: int = 2  # random shifts of up to this many pixels
    flip: bool = False  # random horizontal mirror images (only where the data set's spec is mirror-symmetric)
    channels_last: bool = False  # NHWC is ~20% faster for LeNet here, ~10% slower for the MNIST ConvNet (measured)
    # One-cycle schedule: starts at lr/div_factor, peaks at lr after pct_start, ends at lr/div/final_div.
    pct_start: float = 0.25
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    cycle_momentum: bool = True
    bias_lr_scale: float = 1.0  # BatchNorm biases learn this much faster (weight decay scaled down to match)
    lookahead: bool = False  # every 5 steps pull the weights to an EMA whose decay rises over training
    tta: int = 0  # test-time augmentation level for the model card's final accuracy (models/inference.py)


LOOKAHEAD_EVERY = 5


def recipe_for(arch: zoo.Architecture) -> Recipe:
    """The defaults with the network class's `recipe` overrides."""
    return Recipe(**getattr(importlib.import_module(arch.module), arch.class_name).__dict__.get("recipe", {}))


def lookahead_decay(step: int, total_steps: int) -> float:
    """airbench's schedule: no averaging at first, 0.95 per step (0.95**5 per update) by the end."""
    return 0.95**LOOKAHEAD_EVERY * (step / total_steps) ** 3


def lookahead_update(model: nn.Module, ema: dict[str, torch.Tensor], decay: float) -> None:
    """ema ← decay·ema + (1-decay)·weights, then weights ← ema (floating-point state only)."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                ema[name].lerp_(value, 1 - decay)
                value.copy_(ema[name])


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """BatchNorm biases get a group of their own when they learn faster (`bias_lr_scale`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.bias_lr_scale == 1.0:
        return [{"params": trainable, "lr": args.lr, "weight_decay": args.weight_decay}]
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [{"params": [p for p in trainable if id(p) not in bn_biases], "lr": args.lr,
             "weight_decay": args.weight_decay},
            {"params": [p for p in trainable if id(p) in bn_biases], "lr": args.lr * args.bias_lr_scale,
             "weight_decay": args.weight_decay / args.bias_lr_scale}]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=sorted(zoo.ARCHITECTURES))
    p.add_argument("--dataset", choices=sorted(SPECS), help="defaults to the architecture's data set")
    p.add_argument("--data-source", choices=data.SOURCES, default="npz")
    p.add_argument("--data-path", type=Path, required=True,
                   help="the .npz file, or torchvision's root folder (downloaded into when online)")
    p.add_argument("--out", type=Path, required=True, help="weights file; the model card is written beside it")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--resume", type=Path,
                   help="a checkpoint (<checkpoint-dir>/<dataset>_<arch>/epoch-NNN.pt) of an earlier run with the "
                        "same flags")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (then with bf16 autocast and channels_last), else the CPU")
    p.add_argument("--limit", type=int, help="train on the first N training images only (smoke runs)")
    for field, default in asdict(Recipe()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=type(default), default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    arch = zoo.get(args.arch)
    args.dataset = args.dataset or arch.dataset
    if args.dataset != arch.dataset:
        p.error(f"--arch {args.arch} is built for {arch.dataset}, not {args.dataset}")
    recipe = asdict(recipe_for(arch))
    for field in recipe:
        if getattr(args, field) is None:
            setattr(args, field, recipe[field])
    if (args.flip or args.tta) and not SPECS[args.dataset].mirror_symmetric:
        p.error(f"{args.dataset} is not mirror-symmetric (models/specs.py): no --flip or --tta")
    if args.device == "cuda":
        args.channels_last = True  # tensor cores want NHWC; bf16 autocast below (on a CPU without AMX, 12× slower)
    return args


def train_one_epoch(model: nn.Module, split: data.Split, args: argparse.Namespace, epoch: int,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    criterion: nn.Module, ema: dict[str, torch.Tensor] | None) -> tuple[float, float, float]:
    """One pass over the training images; returns (mean loss, accuracy, seconds)."""
    spec = SPECS[args.dataset]
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    torch.manual_seed(args.seed * 100_003 + epoch)  # dropout
    order = torch.randperm(len(split.train_labels), generator=generator)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    batches = order.split(args.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", leave=False, disable=None)
    for idx in bar:
        images = augment(split.train_images[idx], args.translate, args.flip, generator)
        x = spec.normalize(images.to(args.device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = split.train_labels[idx].to(args.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
            out = model(x)
            loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step = scheduler.last_epoch
        if ema is not None and step % LOOKAHEAD_EVERY == 0:
            lookahead_update(model, ema, lookahead_decay(step, scheduler.total_steps))
        total_loss += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    return total_loss / seen, correct / seen, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.dataset]
    arch = zoo.get(args.arch)

    images, labels = data.load(args.dataset, args.data_source, args.data_path)
    split = data.split(images, labels, args.val_size, seed=0)
    for path in reference.write_missing(args.dataset, images, labels, args.val_size):
        print(f"wrote {path} (this data set's first training: the archive's reference / calibration images)")
    if args.limit:
        split = data.Split(split.train_images[: args.limit], split.train_labels[: args.limit],
                           split.val_images, split.val_labels)

    torch.manual_seed(args.seed)
    model = arch.build()
    if hasattr(model, "init_whitening"):  # data-dependent first layer (airbench): from the training images only
        model.init_whitening(spec.normalize(split.train_images[:5000]))
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Seed ConvNet ends in log_softmax: NLL on its output is the cross-entropy the seed trains with.
    is_log_probs = args.arch == "convnet"
    criterion = (nn.NLLLoss() if is_log_probs and args.label_smoothing == 0
                 else nn.CrossEntropyLoss(label_smoothing=args.label_smoothing))
    groups = param_groups(model, args)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    steps_per_epoch = -(-len(split.train_labels) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=args.pct_start, div_factor=args.div_factor, final_div_factor=args.final_div_factor,
        anneal_strategy=args.anneal, cycle_momentum=args.cycle_momentum)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.lookahead else None
    start_epoch, best_accuracy, history = 0, 0.0, []
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=True, map_location=args.device)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
        if ema is not None:
            ema = checkpoint["lookahead_state_dict"]
        start_epoch, best_accuracy = checkpoint["epoch"] + 1, checkpoint["best_accuracy"]
        history = json.loads(checkpoint["history"])
        print(f"resumed from {args.resume} after epoch {start_epoch}")

    checkpoint_dir = args.checkpoint_dir / f"{args.dataset}_{args.arch}"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(start_epoch, args.epochs):
        loss, train_acc, seconds = train_one_epoch(model, split, args, epoch, optimizer, scheduler, criterion, ema)
        predictions = predict(model, split.val_images, spec)
        val_acc = (predictions == split.val_labels).float().mean().item()
        best_accuracy = max(best_accuracy, val_acc)
        history.append({"epoch": epoch + 1, "train_loss": round(loss, 5), "train_accuracy": round(train_acc, 5),
                        "val_accuracy": round(val_acc, 5), "seconds": round(seconds, 2),
                        "images_per_second": round(len(split.train_labels) / seconds, 1),
                        "elapsed_seconds": round(time.perf_counter() - wall_start, 1)})
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  train {train_acc:.4f}  "
              f"val {val_acc:.4f}  {seconds:.1f}s  {len(split.train_labels) / seconds:.0f} img/s", flush=True)
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
                    "best_accuracy": best_accuracy, "history": json.dumps(history),
                    **({"lookahead_state_dict": ema} if ema is not None else {})},
                   checkpoint_dir / f"epoch-{epoch + 1:03d}.pt")

    model = model.to("cpu", memory_format=torch.contiguous_format)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    report = accuracy_report(predict(model, split.val_images, spec, tta=args.tta), split.val_labels, spec)
    report["tta"] = args.tta
    if args.tta:
        report["accuracy_without_tta"] = round(
            (predict(model, split.val_images, spec) == split.val_labels).float().mean().item(), 5)
    train_seconds = sum(h["seconds"] for h in history)
    card = {
        "model": args.dataset,
        "architecture": {"name": args.arch, "class": f"{arch.module}.{arch.class_name}",
                         "parameters": sum(p.numel() for p in model.parameters())},
        "input": {"shape": list(spec.input_shape), "mean": list(spec.mean), "std": list(spec.std),
                  "classes": list(spec.classes)},
        "data": {"source": args.data_source, "path": str(args.data_path),
                 "sha256": sha256_of(args.data_path) if args.data_source == "npz" else None,
                 "train_images": len(split.train_labels)},
        "validation_split": {"method": "np.random.default_rng(0).permutation(n)[:val_size]",
                             "seed": 0, "size": args.val_size},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                     "optimizer": {"name": "SGD", "lr": args.lr, "momentum": args.momentum, "nesterov": True,
                                   "weight_decay": args.weight_decay, "bn_bias_lr_scale": args.bias_lr_scale,
                                   "lookahead": args.lookahead},
                     "schedule": {"name": "OneCycleLR", "max_lr": args.lr, "pct_start": args.pct_start,
                                  "div_factor": args.div_factor, "final_div_factor": args.final_div_factor,
                                  "anneal": args.anneal, "cycle_momentum": args.cycle_momentum},
                     "loss": type(criterion).__name__, "label_smoothing": args.label_smoothing,
                     "augmentation": {"translate": args.translate, "horizontal_flip": args.flip},
                     "threads": args.threads, "channels_last": args.channels_last, "device": args.device,
                     "autocast": "bf16" if args.device == "cuda" else None,
                     "train_seconds": round(train_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - wall_start, 1),
                     "images_per_second": round(len(split.train_labels) * len(history) / train_seconds, 1),
                     "resumed": bool(args.resume)},
        "validation": report,
        "calibration": calibration_report(model, split.val_images, split.val_labels, spec),
        "history": history,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "weights": {"file": args.out.name, "sha256": sha256_of(args.out), "bytes": args.out.stat().st_size},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card_path = args.out.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"validation accuracy {report['accuracy']:.4f}; wrote {args.out} and {card_path}")
    return card


if __name__ == "__main__":
    main()
