"""Temperature scaling and the measures that say whether a probability can be trusted.

A served probability should mean what it says: of the answers given with confidence 0.8, about 80% right.
Label smoothing (cifar10 2.0 trains with 0.2) flattens the softmax, so 2.0 said 0.74 on average while being
right 93% of the time. One scalar T, fitted on the held-out validation split by minimising the negative
log-likelihood, rescales the logits (softmax(z / T)); it cannot change which class is on top at TTA level 0.
With test-time augmentation the served probability is the mean of the views' calibrated probabilities, so T is
fitted for that mean, per TTA level.

Measures (all on top-1 unless named): expected calibration error over 15 equal-width confidence bins (the
weighted mean gap between accuracy and confidence), NLL, and the Brier score (mean squared error of the whole
probability vector against the one-hot label).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from models.inference import mean_softmax

BINS = 15
T_RANGE = (0.05, 20.0)  # searched in log space; the shipped models land between 0.5 and 1.5


def probabilities(view_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """[V, N, C] logits of V augmented views (weights summing to 1) → [N, C] mean calibrated probabilities, by the
    serving formula (`models.inference.mean_softmax`), in float64 for the fit."""
    return mean_softmax(view_logits.double(), weights.tolist(), temperature)


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return -torch.log(probs[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(1).mean().item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: how many answers, their mean confidence and their accuracy."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)  # confidence 1.0 belongs to the last bin
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": count,
                     "confidence": confidence[mask].mean().item() if count else None,
                     "accuracy": correct[mask].mean().item() if count else None})
    return rows


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    total = len(labels)
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"])
               for r in reliability(probs, labels, bins) if r["count"])


def measures(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    confidence, predicted = probs.max(1)
    return {"accuracy": round((predicted == labels).double().mean().item(), 5),
            "mean_confidence": round(confidence.mean().item(), 5), "ece": round(ece(probs, labels), 5),
            "nll": round(nll(probs, labels), 5), "brier": round(brier(probs, labels), 5)}


def fit_temperature(view_logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in T_RANGE minimising the NLL of the mean calibrated probabilities (golden-section search on log T:
    the NLL of softmax(z / T) is unimodal in T, convex in 1/T for a single view)."""
    def loss(log_t: float) -> float:
        return nll(probabilities(view_logits, weights, math.exp(log_t)), labels)

    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > 1e-6:
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return round(math.exp((low + high) / 2), 5)


def calibrate(view_logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> dict:
    """T fitted on all of the given images, the measures before and after, and a 2-fold cross-check (T fitted on
    one half, measured on the other) that shows the in-sample numbers are not an artefact of the fit."""
    temperature = fit_temperature(view_logits, weights, labels)
    before = probabilities(view_logits, weights, 1.0)
    after = probabilities(view_logits, weights, temperature)
    half = len(labels) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    held_out = []
    for fit_on, test_on in folds:
        t = fit_temperature(view_logits[:, fit_on], weights, labels[fit_on])
        held_out.append(ece(probabilities(view_logits[:, test_on], weights, t), labels[test_on]))
    return {"temperature": temperature, "images": len(labels), "bins": BINS,
            "before": measures(before, labels), "after": measures(after, labels),
            "ece_two_fold": round(sum(held_out) / 2, 5),
            "reliability_before": reliability(before, labels), "reliability_after": reliability(after, labels)}


def plot_reliability(report: dict, title: str, path: Path) -> None:
    """Accuracy per confidence bin (bars) against what the model said (dots on the diagonal), before and after
    temperature scaling: a bar below its dot is overconfidence, above it underconfidence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, key, label in ((axes[0], "before", "before (T = 1)"),
                           (axes[1], "after", f"after (T = {report['temperature']:.3f})")):
        rows = [r for r in report[f"reliability_{key}"] if r["count"]]
        ax.bar([r["low"] for r in rows], [r["accuracy"] for r in rows], width=1 / report["bins"], align="edge",
               edgecolor="black", color="#4c72b0", label="accuracy in the bin")
        ax.plot([r["confidence"] for r in rows], [r["confidence"] for r in rows], "o", color="#dd8452",
                label="what the model said (mean confidence)")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        measured = report[key]
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)",
               title=f"{label}: ECE {measured['ece']:.1%}, NLL {measured['nll']:.3f}")
        ax.legend(loc="lower right")
    axes[0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
