"""Comparing answers of the classifier with a stated tolerance, per numeric mode.

Two answers for the same image, from server-side batches of different sizes or compositions, run different oneDNN
kernels. How far apart that puts them depends on the mode the worker serves with (models/numerics.py), which
depends on the host:

- fp32 and fp32-cl compute in float32 throughout: kernels differ by about 1e-7 in a probability, and the server
  rounds to 6 places (up to 5e-7 more). Tolerance 1e-5: 20x the observed difference, far below what a different
  image or model changes.
- bf16 rounds every convolution's output to bfloat16 (8 bits of mantissa, a relative step of 2^-8 = 0.4%), so one
  kernel's different summation order can move an activation by a whole bf16 step, and the softmax after it by far
  more than float noise. Measured on 600 validation images per version, one thread, batches of 1, 3 and 64
  against 8: at most 1.2e-6 with this host's native AVX512-BF16 (AMD EPYC), 0 with oneDNN limited to AVX2
  (ONEDNN_MAX_CPU_ISA=AVX2, bf16 emulated) and 7.3e-4 with it limited to AVX512_CORE (cifar10 1.0, batch 1 vs 8).
  Tolerance 5e-3: 7x the worst of those; bf16 against fp32 differs by up to 2.5e-2 on the same images, so an
  answer computed in the wrong mode still fails.

- ort-fp32 and ort-int8 (ONNX Runtime) gave bitwise the same probabilities at batch 1, 3, 8 and 64 (600 validation
  images per version, one thread, AMD EPYC with AVX2): only the server's rounding to 6 places remains. Tolerance
  1e-5, as fp32's; int8 against fp32 differs by up to 0.31 (cifar10 2.0) and 1.7e-2 (mnist) on the same images,
  and ort-fp32 against torch fp32 by up to 2.3e-6.

A top-1 computed independently in the same mode may then differ from the served one only where the reference's
two best probabilities lie within twice the mode's tolerance of each other (a tie those kernels decide either way).
"""
from __future__ import annotations

from typing import Any

import torch

TOLERANCE = {"fp32": 1e-5, "fp32-cl": 1e-5, "bf16": 5e-3, "ort-fp32": 1e-5, "ort-int8": 1e-5}
PROBABILITY_TOLERANCE = TOLERANCE["fp32"]  # the default: answers of an fp32 mode


def tolerance(mode: str) -> float:
    """The probability tolerance for answers served in `mode` (a worker's `describe()["numerics"]["mode"]`)."""
    if mode not in TOLERANCE:
        raise KeyError(f"no stated tolerance for numeric mode {mode!r}: add one to tests/answers.py, with the "
                       "measurement that justifies it")
    return TOLERANCE[mode]


def same(a: Any, b: Any, tol: float = PROBABILITY_TOLERANCE) -> bool:
    """Equal answers: lists element-wise, KServe envelopes by their predictions, top-k dicts: the same top-1 label
    and every probability within `tol`, and a label only one of them lists within `tol` of the other's cut-off
    (a tie at the k-th place)."""
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(same(x, y, tol) for x, y in zip(a, b, strict=True)))
    if isinstance(a, dict) and "predictions" in a:
        return isinstance(b, dict) and same(a["predictions"], b.get("predictions"), tol)
    if not (isinstance(a, dict) and isinstance(b, dict)) or len(a) != len(b) or not a:
        return a == b
    if next(iter(a)) != next(iter(b)) and not _tied_top(a, b, tol):
        return False
    for mine, theirs in ((a, b), (b, a)):
        for label, p in mine.items():
            if label in theirs:
                if abs(p - theirs[label]) > tol:
                    return False
            elif p > min(theirs.values()) + tol:
                return False
    return True


def _tied_top(a: dict, b: dict, tol: float) -> bool:
    """Different top-1 labels that both answers rank within 2 x tol of each other."""
    first_a, first_b = next(iter(a)), next(iter(b))
    return (first_b in a and first_a in b and a[first_a] - a[first_b] <= 2 * tol
            and b[first_b] - b[first_a] <= 2 * tol)


def same_response(a: tuple[int, Any], b: tuple[int, Any], tol: float = PROBABILITY_TOLERANCE) -> bool:
    """(status, body) pairs from the in-process harness."""
    return a[0] == b[0] and same(a[1], b[1], tol)


def unexplained_top1_differences(served: torch.Tensor, probabilities: torch.Tensor, mode: str) -> list[int]:
    """Indices where the served top-1 differs from the reference's (`probabilities`: [N, classes], computed in the
    same mode) although the reference's best two classes are more than 2 x tolerance(mode) apart."""
    top2 = probabilities.topk(2, dim=1).values
    differ = served != probabilities.argmax(1)
    return (differ & (top2[:, 0] - top2[:, 1] >= 2 * tolerance(mode))).nonzero().flatten().tolist()
