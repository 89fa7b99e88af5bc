"""Comparing two answers of the classifier across server-side batch sizes, with a stated tolerance.

A forward pass over 1 image and over 8 runs different oneDNN kernels, which differ by about 1e-7 in a
probability, and the server rounds to 6 places, which adds up to 5e-7; which kernels run depends on the host's
CPU. So two answers for the same image are "the same" when they agree on the top-1 label and every probability
within PROBABILITY_TOLERANCE (20x the observed difference, far below what a different image or model changes),
and a label only one of them lists lies within that tolerance of the other's cut-off (a tie at the k-th place).
"""
from __future__ import annotations

from typing import Any

PROBABILITY_TOLERANCE = 1e-5


def same(a: Any, b: Any) -> bool:
    """Equal answers: lists element-wise, KServe envelopes by their predictions, top-k dicts as described above."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and "predictions" in a:
        return isinstance(b, dict) and same(a["predictions"], b.get("predictions"))
    if not (isinstance(a, dict) and isinstance(b, dict)) or len(a) != len(b) or not a:
        return a == b
    if next(iter(a)) != next(iter(b)):
        return False
    for mine, theirs in ((a, b), (b, a)):
        for label, p in mine.items():
            if label in theirs:
                if abs(p - theirs[label]) > PROBABILITY_TOLERANCE:
                    return False
            elif p > min(theirs.values()) + PROBABILITY_TOLERANCE:
                return False
    return True


def same_response(a: tuple[int, Any], b: tuple[int, Any]) -> bool:
    """(status, body) pairs from the in-process harness."""
    return a[0] == b[0] and same(a[1], b[1])
