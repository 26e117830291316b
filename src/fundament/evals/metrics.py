"""Classification metrics over gold and predicted labels: accuracy, per-class and macro F1, and
expected calibration error of the predicted label's probability. Plain Python and numpy; knows
nothing of models or tasks.
"""

from __future__ import annotations

import numpy as np


def accuracy(gold: list[str], pred: list[str]) -> float:
    _same_length(gold, pred)
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def per_class_f1(gold: list[str], pred: list[str], classes: list[str]) -> dict[str, float]:
    """F1 of each class against the rest; 0 for a class never gold nor predicted correctly."""
    _same_length(gold, pred)
    out = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        out[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def macro_f1(gold: list[str], pred: list[str], classes: list[str]) -> float:
    """The unweighted mean of the per-class F1 over `classes`."""
    f1 = per_class_f1(gold, pred, classes)
    return sum(f1.values()) / len(classes)


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """ECE (Guo et al. 2017): the predicted label's probability in `bins` equal-width bins over
    [0, 1]; the mean |accuracy - confidence| of each bin, weighted by its share of the inputs."""
    _same_length(confidence, correct)
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    # Bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to the first bin.
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(hit[inside].mean() - conf[inside].mean())
    return float(ece)


def _same_length(a, b) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"need two equally long, non-empty lists (got {len(a)} and {len(b)})")
