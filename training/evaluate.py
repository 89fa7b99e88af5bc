"""Evaluate shipped weights on the validation split: accuracy per class, confusion matrix, and plots.

    python -m training.evaluate --weights models/weights/cifar10_lenet.pt --data-path ../shared/data/cifar10_train.npz

Prints overall and per-class accuracy, the confusion matrix and the calibration (a temperature per TTA level,
with ECE / NLL / Brier before and after), writes the calibration into the model card, and draws
`<weights>.confusion.png`, `<weights>.curve.png` (from the card's per-epoch history) and
`<weights>.reliability.png` (before/after temperature scaling) beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import calibration, zoo
from models.inference import TTA_WEIGHTS, tta_logits, tta_views
from models.specs import SPECS, DatasetSpec


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, batch_size: int = 1000,
            tta: int = 0) -> torch.Tensor:
    """Top-1 class indices (on the CPU) for uint8 images, run where the model is, in eval mode; restores the
    model's previous mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = torch.cat([tta_logits(model, spec.normalize(chunk.to(device)), tta).argmax(1).cpu()
                             for chunk in images.split(batch_size)])
    model.train(was_training)
    return predictions


@torch.inference_mode()
def view_logits(model: nn.Module, images: torch.Tensor, spec: DatasetSpec, level: int,
                batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """([V, N, C] float32 logits, [V] view weights) of every TTA view of every image, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = [[model(view).float().cpu() for _, view in tta_views(spec.normalize(chunk.to(device)), level)]
              for chunk in images.split(batch_size)]
    model.train(was_training)
    weights = torch.tensor(TTA_WEIGHTS[level], dtype=torch.float64)
    return torch.stack([torch.cat(views) for views in zip(*chunks, strict=True)]), weights


def calibration_report(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec) -> dict:
    """The model card's `calibration` section: a temperature per TTA level, fitted on these (validation) images,
    with ECE / NLL / Brier before and after (models/calibration.py)."""
    levels = {str(level): calibration.calibrate(*view_logits(model, images, spec, level), labels)
              for level in spec.tta_levels}
    return {"method": "temperature scaling: softmax(logits / T), T minimising NLL on the validation split; with "
                      "TTA the mean of the views' calibrated probabilities",
            "levels": levels}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, -1)


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec) -> dict:
    matrix = confusion_matrix(predictions, labels, spec.num_classes)
    per_class = (matrix.diag() / matrix.sum(1).clamp(min=1)).tolist()
    return {"images": len(labels), "accuracy": round((predictions == labels).float().mean().item(), 5),
            "per_class": {name: round(acc, 5) for name, acc in zip(spec.classes, per_class, strict=True)},
            "confusion_matrix": matrix.tolist()}


def plot_confusion(report: dict, spec: DatasetSpec, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(spec.num_classes), spec.classes, rotation=45, ha="right")
    ax.set_yticks(range(spec.num_classes), spec.classes)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, int(value), ha="center", va="center", fontsize=7,
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{spec.name}: validation accuracy {report['accuracy']:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(history: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history])
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], label="train (augmented)")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from models import data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="a state_dict with a model card (.json) beside it")
    p.add_argument("--data-source", choices=data.SOURCES, default="npz")
    p.add_argument("--data-path", type=Path, required=True)
    p.add_argument("--limit", type=int, help="evaluate the first N validation images only (the card is not "
                                             "rewritten)")
    args = p.parse_args(argv)

    card = json.loads(args.weights.with_suffix(".json").read_text())
    spec = SPECS[card["model"]]
    model = zoo.get(card["architecture"]["name"]).build()
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    images, labels = data.load(spec.name, args.data_source, args.data_path)
    split = data.split(images, labels, card["validation_split"]["size"], seed=card["validation_split"]["seed"])
    val_images, val_labels = split.val_images[: args.limit], split.val_labels[: args.limit]
    report = accuracy_report(predict(model, val_images, spec), val_labels, spec)
    report["calibration"] = calibration_report(model, val_images, val_labels, spec)

    print(f"{spec.name} {card['architecture']['name']}: accuracy {report['accuracy']:.4f} "
          f"on {report['images']} validation images")
    width = max(len(c) for c in spec.classes)
    for name, acc in report["per_class"].items():
        print(f"  {name:>{width}}  {acc:.4f}")
    print("confusion matrix (rows: true, columns: predicted)")
    for name, row in zip(spec.classes, report["confusion_matrix"], strict=True):
        print(f"  {name:>{width}}  " + " ".join(f"{v:5d}" for v in row))
    print("calibration (validation split; ECE over 15 bins, before → after temperature scaling):")
    for level, fitted in report["calibration"]["levels"].items():
        before, after = fitted["before"], fitted["after"]
        print(f"  tta {level}: T {fitted['temperature']:.4f}  ECE {before['ece']:.2%} → {after['ece']:.2%} "
              f"(2-fold held out {fitted['ece_two_fold']:.2%})  NLL {before['nll']:.4f} → {after['nll']:.4f}  "
              f"Brier {before['brier']:.4f} → {after['brier']:.4f}")
    stem = args.weights.with_suffix("")
    title = f"{spec.name} {card['architecture']['name']}"
    plot_confusion(report, spec, Path(f"{stem}.confusion.png"))
    plot_curve(card["history"], title, Path(f"{stem}.curve.png"))
    calibration.plot_reliability(report["calibration"]["levels"]["0"], f"{title}: reliability on the validation "
                                 "split", Path(f"{stem}.reliability.png"))
    print(f"wrote {stem}.confusion.png, {stem}.curve.png and {stem}.reliability.png")
    if args.limit is None:
        card["calibration"] = report["calibration"]
        args.weights.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        print(f"wrote the calibration into {args.weights.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
